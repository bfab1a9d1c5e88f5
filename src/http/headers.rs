//! Response headers every answer carries: responses are never cached (they
//! are per-account, or say something about the service's state at one
//! moment), content types are not sniffed, pages are not framed, and behind
//! TLS the browser is told to stay on HTTPS (HSTS).

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

const HSTS: HeaderValue = HeaderValue::from_static("max-age=31536000; includeSubDomains");
/// The console is plain HTML with inline styles, forms and links: nothing else
/// may load, and nobody may frame it.
const CONSOLE_CSP: HeaderValue = HeaderValue::from_static(
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'",
);

/// True when the client reached us over TLS: our public URL is HTTPS (a
/// TLS-terminating proxy in front), or the proxy says so.
fn over_tls(public_https: bool, headers: &HeaderMap) -> bool {
    public_https
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
}

/// `public_https`: `SLATE_PUBLIC_URL` is an `https://` URL (decided once,
/// when the router is built).
pub async fn security_headers(public_https: bool, req: Request, next: Next) -> Response {
    let tls = over_tls(public_https, req.headers());
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    // Authenticated answers (event streams included) must never sit in a
    // shared or browser cache; the public ones (health, metrics, the OpenAPI
    // document) are cheap to make again.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    let html = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html"));
    if html {
        h.insert(header::CONTENT_SECURITY_POLICY, CONSOLE_CSP);
    }
    if tls {
        h.insert(header::STRICT_TRANSPORT_SECURITY, HSTS);
    }
    response
}
