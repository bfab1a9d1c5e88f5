//! `GET /v1/credits` and `GET /v1/credits/ledger`.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, Auth, Json, Query};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/credits", get(balance))
        .route("/v1/credits/ledger", get(ledger))
}

/// The credit balance.
///
/// Available, reserved and debt, and every bucket with what is left in it.
#[utoipa::path(
    get,
    path = "/v1/credits",
    tag = "credits",
    operation_id = "get_credits",
    responses((status = 200, description = "The balance", body = slate_events::credits::Balance)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn balance(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Value>, ApiError> {
    let mut conn = super::scoped::scoped(&state.pool, auth.account_id).await?;
    let b = slate_events::credits::balance(&mut conn, auth.account_id).await?;
    Ok(Json(
        serde_json::to_value(b).map_err(|e| ApiError::Internal(e.into()))?,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct Page {
    /// Where to continue: `next_cursor` of the previous page (the list is
    /// newest first); empty or absent for the first.
    #[serde(default, deserialize_with = "super::extract::empty_is_none")]
    cursor: Option<i64>,
    /// 1 to 200 (default 50; empty is the default).
    #[serde(default, deserialize_with = "super::extract::empty_is_none")]
    limit: Option<i64>,
}

/// The credit ledger.
///
/// The account's credit movements, newest first, by keyset pagination (a
/// parameter not listed here is 400 `invalid_query`, not ignored).
#[utoipa::path(
    get,
    path = "/v1/credits/ledger",
    tag = "credits",
    operation_id = "list_ledger",
    params(Page),
    responses((status = 200, description = "A page of movements", body = super::openapi::schemas::LedgerPage)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn ledger(
    State(state): State<AppState>,
    auth: Auth,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(50).clamp(1, 200);
    let mut conn = super::scoped::scoped(&state.pool, auth.account_id).await?;
    let mut entries =
        slate_events::credits::ledger_page(&mut conn, auth.account_id, page.cursor, limit + 1)
            .await?;
    let more = entries.len() as i64 > limit;
    entries.truncate(limit as usize);
    let next = if more {
        entries.last().map(|e| e.position)
    } else {
        None
    };
    Ok(Json(json!({ "entries": entries, "next_cursor": next })))
}
