//! Staff audit-log investigation: `GET /admin/audit` (filters, stable
//! cursor), `GET /admin/audit/{id}` (causing event, related entries),
//! `GET /admin/audit/export` (JSON Lines or CSV). Every read is itself
//! recorded, and so appears in the audit log.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState, Json, Path, Query, Staff};
use crate::audit::{AuditEntry, CSV_HEADER, Filter, csv_line, query};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/audit", get(search))
        .route("/admin/audit/export", get(export))
        .route("/admin/audit/{id}", get(detail))
}

async fn audited(
    state: &AppState,
    staff: Uuid,
    account: Option<Uuid>,
    what: &str,
) -> Result<(), ApiError> {
    slate_events::access::record_staff_read(&state.appends, staff, account.unwrap_or(staff), what)
        .await?;
    Ok(())
}

async fn search(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Query(f): Query<Filter>,
) -> Result<Json<Value>, ApiError> {
    let limit = f.limit.unwrap_or(50).clamp(1, 200);
    let mut rows = query(&state.pool, &f, limit + 1, false).await?;
    audited(&state, staff.account_id, f.account, "audit:search").await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|e| e.seq)
    } else {
        None
    };
    Ok(Json(json!({ "data": rows, "next_cursor": next })))
}

async fn detail(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let seq: i64 = id.parse().map_err(|_| ApiError::not_found())?;
    let entry: AuditEntry = crate::audit::entry(&state.pool, seq)
        .await?
        .ok_or_else(ApiError::not_found)?;
    audited(&state, staff.account_id, entry.account_id, "audit:entry").await?;
    let cause = crate::audit::causing_event(&state.pool, entry.event_id).await?;
    let related = crate::audit::related(&state.pool, &entry).await?;
    Ok(Json(
        json!({ "entry": entry, "cause": cause, "related": related }),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct ExportQuery {
    format: Option<String>,
    #[serde(default, deserialize_with = "crate::audit::bounded_time")]
    from: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "crate::audit::bounded_time")]
    to: Option<DateTime<Utc>>,
    account: Option<Uuid>,
}

/// A range as JSON Lines (default) or CSV, oldest first, streamed page by page.
async fn export(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let csv = match q.format.as_deref() {
        None | Some("jsonl") => false,
        Some("csv") => true,
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_format",
                "format is jsonl or csv",
            ));
        }
    };
    audited(&state, staff.account_id, q.account, "audit:export").await?;
    let filter = Filter {
        account: q.account,
        from: q.from,
        to: q.to,
        ..Default::default()
    };
    let pool = state.pool.clone();
    let header_line = csv.then(|| CSV_HEADER.to_owned());
    let access = super::extract::Reauthorise::new(staff, true);
    let stream = futures::stream::unfold(
        (filter, header_line, false, access),
        move |(mut f, head, done, mut access)| {
            let pool = pool.clone();
            async move {
                if let Some(h) = head {
                    return Some((Ok::<_, std::io::Error>(h), (f, None, done, access)));
                }
                if done {
                    return None;
                }
                // A long export stops, cut short, once the staff member's
                // access is withdrawn.
                if let Err(e) = access.check(&pool).await {
                    return Some((Err(std::io::Error::other(e)), (f, None, true, access)));
                }
                let page = match query(&pool, &f, 1000, true).await {
                    Ok(p) => p,
                    Err(e) => {
                        return Some((Err(std::io::Error::other(e)), (f, None, true, access)));
                    }
                };
                let last = page.last()?;
                f.cursor = Some(last.seq);
                let done = page.len() < 1000;
                let chunk: String = page
                    .iter()
                    .map(|e| {
                        if csv {
                            csv_line(e)
                        } else {
                            format!("{}\n", serde_json::to_string(e).unwrap_or_default())
                        }
                    })
                    .collect();
                Some((Ok(chunk), (f, None, done, access)))
            }
        },
    );
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response())
}
