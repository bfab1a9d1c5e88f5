//! `/healthz` (the process answers) and `/readyz` (its dependencies answer).

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{Value, json};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// Liveness.
///
/// The process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "The process answers", body = super::openapi::schemas::Health)),
)]
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Readiness.
///
/// PostgreSQL and Redis answer within 2 seconds each.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready", body = super::openapi::schemas::Readiness),
        (status = 503, description = "A dependency is failing (not the error format: the checks say which)", body = super::openapi::schemas::Readiness),
    ),
)]
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let postgres =
        tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("select 1").execute(&state.pool))
            .await
            .map_err(|_| "timeout")
            .and_then(|r| r.map(|_| ()).map_err(|_| "unreachable"));
    let redis = tokio::time::timeout(CHECK_TIMEOUT, ping_redis(&state.redis))
        .await
        .map_err(|_| "timeout")
        .and_then(|r| r.map_err(|_| "unreachable"));
    let show = |r: &Result<(), &'static str>| match r {
        Ok(()) => "ok",
        Err(e) => e,
    };
    if let Err(e) = &postgres {
        tracing::warn!(reason = e, "readiness: postgres failing");
    }
    if let Err(e) = &redis {
        tracing::warn!(reason = e, "readiness: redis failing");
    }
    let ready = postgres.is_ok() && redis.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "unavailable" },
            "checks": { "postgres": show(&postgres), "redis": show(&redis) },
        })),
    )
}

async fn ping_redis(client: &redis::Client) -> redis::RedisResult<()> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok(())
}
