//! Staff routes (`/admin/…`): the staff role is required; every read is
//! itself recorded in the log.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState, Json, Path, Staff};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/accounts/{id}", get(account))
        .route(
            "/admin/accounts/{id}/restore",
            axum::routing::post(restore_account),
        )
        .route(
            "/admin/impersonations",
            axum::routing::post(start_impersonation),
        )
        .route(
            "/admin/impersonations/{id}",
            axum::routing::delete(end_impersonation),
        )
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StartImpersonation {
    account_id: Uuid,
    reason: String,
    /// At most 60 (and never extended).
    #[serde(default)]
    minutes: Option<i64>,
}

/// Start acting as an account: at most 60 minutes, with a reason. Requests
/// then carry `Slate-Impersonate: <id>` with the staff member's credentials.
async fn start_impersonation(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Json(body): Json<StartImpersonation>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let mut conn = state.pool.acquire().await?;
    let i = slate_events::impersonation::start(
        &mut conn,
        staff.account_id,
        body.account_id,
        &body.reason,
        body.minutes.unwrap_or(60),
        staff.staff_metadata(),
    )
    .await
    .map_err(impersonation_refused)?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(serde_json::to_value(i).map_err(|e| ApiError::Internal(e.into()))?),
    ))
}

/// Why an impersonation did not start, as the API and the console say it:
/// the request's mistake (422), an unknown account (404), or the service's
/// trouble (a database out of reach is 503, not the caller's mistake).
pub(crate) fn impersonation_refused(e: slate_events::Error) -> ApiError {
    match e {
        slate_events::Error::InvalidArgument(_) => ApiError::unprocessable(
            "invalid_impersonation",
            "a reason (3-500 characters) and another account are needed",
        ),
        slate_events::Error::UnknownAccount(_) => ApiError::not_found(),
        other => other.into(),
    }
}

async fn end_impersonation(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Path(id): Path<String>,
) -> Result<axum::http::StatusCode, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found())?;
    let mut conn = state.pool.acquire().await?;
    let i =
        slate_events::impersonation::resolve(&mut conn, staff.account_id, id, chrono::Utc::now())
            .await?
            .ok_or_else(ApiError::not_found)?;
    slate_events::impersonation::end(&mut conn, &i, "ended_by_staff", staff.staff_metadata())
        .await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Undo a soft delete within its 30-day grace period. Old sessions and keys
/// stay ended; the user signs in again.
async fn restore_account(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found())?;
    let metadata = staff.staff_metadata();
    let mut tx = state.pool.begin().await?;
    let restored =
        slate_events::accounts::restore(&mut tx, id, chrono::Utc::now(), metadata).await?;
    match restored {
        slate_events::accounts::Restore::Restored => {}
        slate_events::accounts::Restore::NotRestorable => {
            return Err(ApiError::conflict(
                "not_restorable",
                "the account is not deleted, or its grace period has passed",
            ));
        }
        slate_events::accounts::Restore::UnknownAccount => return Err(ApiError::not_found()),
    }
    let renewal = slate_workers::renewal::enqueue(&mut tx, id)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    tx.commit().await?;
    renewal.send(&state.pool).await;
    Ok(Json(json!({ "account_id": id, "restored": true })))
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
    slate_events::access::record_staff_read(
        &state.appends,
        staff.account_id,
        id,
        "account",
        &staff.staff_metadata(),
    )
    .await?;
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
