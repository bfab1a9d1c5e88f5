//! Staff routes (`/admin/…`): the staff role is required; every read is
//! itself recorded in the log.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState, Json, Staff};

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/accounts/{id}", get(account))
}

/// An account at a glance: profile, balance, generations by status.
async fn account(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found())?;
    let mut conn = state.pool.acquire().await?;
    let account = slate_events::accounts::get_account(&mut conn, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    slate_events::access::record_staff_read(&mut conn, staff.account_id, id, "account").await?;
    let balance = slate_events::credits::balance(&mut conn, id).await?;
    let generations: Vec<(String, i64)> = sqlx::query_as(
        "select status, count(*) from generations where account_id = $1 group by 1 order by 1",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(json!({
        "account": account,
        "credits": { "available": balance.available, "reserved": balance.reserved, "debt": balance.debt },
        "generations": generations.into_iter().map(|(s, n)| json!({"status": s, "count": n})).collect::<Vec<_>>(),
    })))
}
