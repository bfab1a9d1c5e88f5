//! Staff audit-log investigation: `GET /admin/audit` (filters, stable
//! cursor), `GET /admin/audit/{id}` (causing event, related entries),
//! `GET /admin/audit/export` (JSON Lines or CSV). Every read is itself
//! recorded, and so appears in the audit log.

use std::collections::BTreeSet;

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

use super::{ApiError, AppState, Auth, Json, Path, Query, Staff};
use crate::audit::{AuditEntry, CSV_HEADER, Filter, Shows, csv_line, query};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/audit", get(search))
        .route("/admin/audit/export", get(export))
        .route("/admin/audit/{id}", get(detail))
}

/// A staff read is recorded against each account whose entries it shows,
/// so each account's own trail says which staff member saw it, and against
/// the account asked for; a read that names no account is recorded against
/// the staff member. (Recorded against the account asked for alone, a
/// search by request id, actor or target, or an unfiltered one, left no
/// mark on the trails of the accounts it showed.) Entries that are
/// themselves records of staff reads do not count: reading them shows who
/// read what, not the account's data, and counted, every look at them
/// made more of them.
pub(crate) async fn record_reads(
    appends: &slate_events::store::GroupCommit,
    staff: &Auth,
    asked: impl IntoIterator<Item = Uuid>,
    shown: &[AuditEntry],
    what: &str,
) -> Result<(), slate_events::Error> {
    let mut accounts = accounts_shown(shown);
    accounts.extend(asked);
    if accounts.is_empty() {
        accounts.insert(staff.account_id);
    }
    let request = staff.staff_metadata();
    record_reads_of(appends, (staff.account_id, &request), accounts, what).await
}

/// The accounts whose data `shown` shows (see [`record_reads`]): each
/// entry's account, and the accounts whose sealed values were opened in it
/// (a refused key's address, sealed for the key's owner, is the owner's
/// data though the entry names no account).
fn accounts_shown(shown: &[AuditEntry]) -> BTreeSet<Uuid> {
    shown
        .iter()
        .filter(|e| e.action != slate_events::projections::audit::STAFF_READ)
        .flat_map(AuditEntry::accounts)
        .collect()
}

/// One `StaffRead` per account, each with the staff member's request.
async fn record_reads_of(
    appends: &slate_events::store::GroupCommit,
    (staff, request): (Uuid, &slate_events::Metadata),
    accounts: BTreeSet<Uuid>,
    what: &str,
) -> Result<(), slate_events::Error> {
    futures::future::try_join_all(accounts.into_iter().map(|account| {
        slate_events::access::record_staff_read(appends, staff, account, what, request)
    }))
    .await?;
    Ok(())
}

async fn search(
    State(state): State<AppState>,
    Staff(staff): Staff,
    Query(f): Query<Filter>,
) -> Result<Json<Value>, ApiError> {
    let limit = f.limit.unwrap_or(50).clamp(1, 200);
    let mut rows = query(&state.pool, &f, limit + 1, false, Shows::Everything).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    record_reads(&state.appends, &staff, f.account, &rows, "audit:search").await?;
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
    let entry: AuditEntry = crate::audit::entry(&state.pool, seq, Shows::Everything)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let cause = crate::audit::causing_event(&state.pool, entry.event_id).await?;
    let related = crate::audit::related(&state.pool, &entry, Shows::Everything).await?;
    record_reads(
        &state.appends,
        &staff,
        crate::audit::accounts_read(&entry, cause.as_ref()),
        &related,
        "audit:entry",
    )
    .await?;
    let cause = cause.map(|c| c.event);
    Ok(Json(
        json!({ "entry": entry, "cause": cause, "related": related }),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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
    record_reads(&state.appends, &staff, q.account, &[], "audit:export").await?;
    let filter = Filter {
        account: q.account,
        from: q.from,
        to: q.to,
        ..Default::default()
    };
    let pool = state.pool.clone();
    let appends = state.appends.clone();
    let (staff_id, request) = (staff.account_id, staff.staff_metadata());
    let header_line = csv.then(|| CSV_HEADER.to_owned());
    // CSV has no column for the request's origin, so it is not opened.
    let shows = if csv {
        Shows::NoOrigin
    } else {
        Shows::Everything
    };
    let access = super::extract::Reauthorise::new(staff, true);
    // The state carries the accounts this export has recorded a read of:
    // each is recorded once, before its first entries are sent.
    let stream = futures::stream::unfold(
        (
            filter,
            header_line,
            false,
            access,
            q.account.into_iter().collect(),
        ),
        move |(mut f, head, done, mut access, mut recorded)| {
            let (pool, appends, request) = (pool.clone(), appends.clone(), request.clone());
            async move {
                if let Some(h) = head {
                    return Some((
                        Ok::<_, std::io::Error>(h),
                        (f, None, done, access, recorded),
                    ));
                }
                if done {
                    return None;
                }
                let fail = |e: std::io::Error, f, access, recorded| {
                    Some((Err(e), (f, None, true, access, recorded)))
                };
                // A long export stops, cut short, once the staff member's
                // access is withdrawn.
                if let Err(e) = access.check(&pool).await {
                    return fail(std::io::Error::other(e), f, access, recorded);
                }
                let page = match query(&pool, &f, 1000, true, shows).await {
                    Ok(p) => p,
                    Err(e) => return fail(std::io::Error::other(e), f, access, recorded),
                };
                let last = page.last()?;
                f.cursor = Some(last.seq);
                let done = page.len() < 1000;
                // Each account whose data a page shows beyond the account
                // asked for (any, for the whole log; one whose key sealed an
                // address shown, for an account's) is recorded before the
                // page is sent.
                let new: BTreeSet<Uuid> = accounts_shown(&page)
                    .difference(&recorded)
                    .copied()
                    .collect();
                if !new.is_empty() {
                    if let Err(e) =
                        record_reads_of(&appends, (staff_id, &request), new.clone(), "audit:export")
                            .await
                    {
                        return fail(std::io::Error::other(e), f, access, recorded);
                    }
                    recorded.extend(new);
                }
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
                Some((Ok(chunk), (f, None, done, access, recorded)))
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
