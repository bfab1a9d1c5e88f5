//! `/v1/generations`: submit, read, list, cancel.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState, Auth, ClientIp, Json};
use crate::generations::{self, SubmitRequest};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/generations", post(submit).get(list))
        .route("/v1/generations/{id}", get(read))
        .route("/v1/generations/{id}/cancel", post(cancel))
}

async fn submit(
    State(state): State<AppState>,
    auth: Auth,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Json(body): Json<SubmitRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    let (status, body) = generations::submit(&state, &auth, ip, key, body).await?;
    Ok((status, Json(body)))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError::not_found())
}

async fn read(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = state.pool.acquire().await?;
    let g = slate_events::generations::get(&mut conn, auth.account_id, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    drop(conn);
    Ok(Json(generations::view(&state, &g).await))
}

#[derive(Debug, Deserialize)]
struct Page {
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(20).clamp(1, 100);
    let mut conn = state.pool.acquire().await?;
    let after = match &page.cursor {
        None => None,
        Some(c) => {
            let id: Uuid = c.parse().map_err(|_| {
                ApiError::bad_request("invalid_cursor", "the cursor is not one this API gave")
            })?;
            let g = slate_events::generations::get(&mut conn, auth.account_id, id)
                .await?
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_cursor", "the cursor is not one this API gave")
                })?;
            Some((g.created_at, g.generation_id))
        }
    };
    let mut items =
        slate_events::generations::list(&mut conn, auth.account_id, after, limit + 1).await?;
    drop(conn);
    let more = items.len() as i64 > limit;
    items.truncate(limit as usize);
    let next = if more {
        items.last().map(|g| g.generation_id.to_string())
    } else {
        None
    };
    let mut data = Vec::with_capacity(items.len());
    for g in &items {
        data.push(generations::view(&state, g).await);
    }
    Ok(Json(json!({ "data": data, "next_cursor": next })))
}

async fn cancel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let (status, body) = generations::cancel(&state, &auth, id).await?;
    Ok((status, Json(body)))
}
