//! `SLATE_DEBUG_BODIES=<route>` (a route template such as `/v1/generations`):
//! log that one route's JSON request and response bodies at debug level
//! (target `slate::bodies`), scrubbed first. Every other route, and every
//! body that is not JSON, is never logged.

use axum::body::{Body, to_bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::{ApiError, AppState};

/// Larger bodies on the debugged route are refused rather than buffered.
const LIMIT: usize = 1 << 20;

const SCRUBBED: &str = "[scrubbed]";

/// Field names whose values are personal or secret, wherever they appear.
const SENSITIVE: &[&str] = &[
    "prompt",
    "text",
    "transcript",
    "output",
    "email",
    "secret",
    "key",
    "token",
    "password",
    "cookie",
    "authorization",
    "signature",
    "url",
];

/// Value prefixes of secrets (ours and Stripe's), scrubbed under any name.
const SECRET_PREFIXES: &[&str] = &["slate_live_", "sk_", "rk_", "whsec_", "re_", "sealed:"];

/// The body as scrubbed JSON, or a note saying it was not logged.
pub fn scrub(bytes: &[u8]) -> String {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(mut v) => {
            scrub_value(&mut v);
            v.to_string()
        }
        Err(_) if bytes.is_empty() => "<empty>".into(),
        Err(_) => format!("<{} bytes, not JSON, not logged>", bytes.len()),
    }
}

fn scrub_value(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                if SENSITIVE.iter().any(|s| k.contains(s)) && !val.is_null() {
                    *val = Value::String(SCRUBBED.into());
                } else {
                    scrub_value(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(scrub_value),
        Value::String(s) if SECRET_PREFIXES.iter().any(|p| s.starts_with(p)) => {
            *s = SCRUBBED.into();
        }
        _ => {}
    }
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

pub async fn log_bodies(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = match (
        state.config.debug_bodies.as_deref(),
        req.extensions().get::<MatchedPath>(),
    ) {
        (Some(wanted), Some(m)) if m.as_str() == wanted => wanted.to_owned(),
        _ => return next.run(req).await,
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = to_bytes(body, LIMIT).await else {
        return ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is too large",
        )
        .into_response();
    };
    tracing::debug!(target: "slate::bodies", %route, body = %scrub(&bytes), "request body");
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if !is_json(response.headers()) {
        tracing::debug!(target: "slate::bodies", %route, status = response.status().as_u16(), "response body not JSON, not logged");
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, LIMIT).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    tracing::debug!(target: "slate::bodies", %route, status = parts.status.as_u16(), body = %scrub(&bytes), "response body");
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personal_and_secret_fields_are_scrubbed_everywhere() {
        let body = br#"{"kind":"video","prompt":"a violet lighthouse","parameters":{"seed":3,"negative_text":"x"},
            "webhook_url":"https://example.com/h","items":[{"email":"a@b.c"},{"note":"whsec_abc"}],"key":null}"#;
        let out: Value = serde_json::from_str(&scrub(body)).unwrap();
        assert_eq!(out["kind"], "video");
        assert_eq!(out["prompt"], SCRUBBED);
        assert_eq!(out["parameters"]["seed"], 3);
        assert_eq!(out["parameters"]["negative_text"], SCRUBBED);
        assert_eq!(out["webhook_url"], SCRUBBED);
        assert_eq!(out["items"][0]["email"], SCRUBBED);
        assert_eq!(out["items"][1]["note"], SCRUBBED);
        assert!(out["key"].is_null());
        assert_eq!(scrub(b"not json"), "<8 bytes, not JSON, not logged>");
    }
}
