//! The HTTP server on port 0 against real PostgreSQL and Redis.

use serde_json::Value;
use slate::config::Config;
use slate::http::AppState;

use crate::harness::{TestDb, redis_url};

pub struct TestApp {
    pub address: String,
    pub db: TestDb,
    pub client: reqwest::Client,
}

/// An app on port 0 with its own database; `env` overrides configuration.
pub async fn spawn_app_with(env: &[(&str, &str)]) -> TestApp {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    serve_app(db, pool, env).await
}

/// Serve `db` through `pool` (which may reach it another way than the
/// test's own pool) on port 0; `env` overrides configuration.
pub async fn serve_app(db: TestDb, pool: sqlx::PgPool, env: &[(&str, &str)]) -> TestApp {
    let config = Config::from_lookup(|k| {
        env.iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
            .or_else(|| match k {
                "DATABASE_URL" => Some(db.url.clone()),
                "REDIS_URL" => Some(redis_url()),
                _ => None,
            })
    })
    .unwrap();
    let state = AppState::new(config, pool).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(slate::server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    TestApp {
        address,
        db,
        client: reqwest::Client::new(),
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

impl TestApp {
    /// A new staff account and an API key for it.
    pub async fn staff(&self) -> (uuid::Uuid, String) {
        let mut conn = self.db.conn().await;
        let email = format!("staff-{}@example.com", uuid::Uuid::new_v4().simple());
        let staff = slate_events::accounts::create_account(
            &mut conn,
            &email,
            true,
            slate_events::Metadata::system(),
        )
        .await
        .unwrap();
        let key = crate::credits::new_key(&mut conn, staff).await;
        (staff, key)
    }

    pub async fn get(&self, path: &str) -> (u16, Value, reqwest::header::HeaderMap) {
        let r = self
            .client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, r.json().await.unwrap_or(Value::Null), headers)
    }
}

#[tokio::test]
async fn health_and_readiness_answer_when_postgres_and_redis_do() {
    let app = spawn_app().await;
    let (status, body, headers) = app.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert!(headers.contains_key("x-request-id"));
    let (status, body, _) = app.get("/readyz").await;
    assert_eq!(
        status, 200,
        "{body} — is Redis running? scripts/services starts it"
    );
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["redis"], "ok");
    let _ = &app.db;
}

#[tokio::test]
async fn readiness_fails_with_503_when_redis_is_unreachable() {
    // Nothing listens on port 1.
    let app = spawn_app_with(&[("REDIS_URL", "redis://127.0.0.1:1")]).await;
    let (status, body, _) = app.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["redis"], "unreachable");
    // Liveness does not depend on anything.
    assert_eq!(app.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn an_unknown_route_is_a_404() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/nope", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn responses_are_never_cached_and_carry_the_security_headers_hsts_only_behind_tls() {
    let app = spawn_app().await;
    let (_, key) = crate::billing::key_for(&app).await;
    let get = |path: &str, https: bool| {
        let mut req = app
            .client
            .get(format!("{}{path}", app.address))
            .bearer_auth(&key);
        if https {
            req = req.header("x-forwarded-proto", "https");
        }
        req.send()
    };
    let r = get("/v1/credits", false).await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert!(!h.contains_key("strict-transport-security"), "plain HTTP");
    assert!(
        !h.contains_key("content-security-policy"),
        "JSON, not a page"
    );
    let r = get("/v1/credits", true).await.unwrap();
    assert_eq!(
        r.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    // Errors too, and the console's pages get a strict CSP.
    let r = app
        .client
        .get(format!("{}/admin", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
}

#[tokio::test]
async fn a_client_request_id_is_kept_only_when_it_is_a_plain_token() {
    let app = spawn_app().await;
    let echo = |id: &'static str| {
        let app = &app;
        async move {
            let r = app
                .client
                .get(format!("{}/healthz", app.address))
                .header("x-request-id", id)
                .send()
                .await
                .unwrap();
            r.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(echo("req-2026.12_02:abc").await, "req-2026.12_02:abc");
    for forged in [
        "abc\" level=error msg=\"forged",
        "a b",
        "<script>",
        "é",
        "x;drop",
    ] {
        let got = echo(forged).await;
        assert_ne!(got, forged);
        assert!(
            uuid::Uuid::parse_str(&got).is_ok(),
            "{forged:?} was replaced by a fresh id, got {got:?}"
        );
    }
    let long: &'static str = Box::leak("a".repeat(129).into_boxed_str());
    assert_ne!(echo(long).await, long);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_format() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/v1/nope", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let r = app
        .client
        .put(format!("{}/v1/credits", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    // A query parameter of the wrong type is ours too, not axum's text.
    let (_, key) = crate::billing::key_for(&app).await;
    let r = app
        .client
        .get(format!("{}/v1/generations?limit=abc", app.address))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_query");
}
