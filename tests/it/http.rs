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
    let redis = env
        .iter()
        .find(|(k, _)| *k == "REDIS_URL")
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(redis_url);
    let config = Config::from_lookup(|k| match k {
        "DATABASE_URL" => Some(db.url.clone()),
        "REDIS_URL" => Some(redis.clone()),
        _ => env
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string()),
    })
    .unwrap();
    let state = AppState::new(config, db.pool.clone()).unwrap();
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
        let key = slate_events::access::create_key(
            &mut conn,
            staff,
            None,
            slate_events::Metadata::system(),
        )
        .await
        .unwrap()
        .plaintext;
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
