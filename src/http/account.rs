//! `GET /v1/account/export`: everything about the account as one JSON
//! bundle, streamed section by section and page by page (never built in
//! memory): profile, its events, ledger, generations with fresh presigned
//! URLs, subscription, sessions and keys (prefixes and labels, never
//! secrets), and the audit entries about it.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::{ApiError, AppState, Auth};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/account/export", get(export))
        .route("/v1/account", axum::routing::delete(delete_account))
}

type Chunk = Result<String, std::io::Error>;

/// Delete the account.
///
/// A soft delete: access stops at once; restorable for 30 days by signing
/// in again; then purged.
#[utoipa::path(
    delete,
    path = "/v1/account",
    tag = "account",
    operation_id = "delete_account",
    responses((status = 202, description = "Deleted: sessions and keys have ended; an email confirms", body = super::openapi::schemas::AccountDeletion)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn delete_account(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Response, ApiError> {
    auth.not_impersonated()?;
    let mut tx = state.pool.begin().await?;
    let purge_after = slate_events::accounts::request_deletion(
        &mut tx,
        auth.account_id,
        chrono::Utc::now(),
        auth.metadata(),
    )
    .await?;
    slate_workers::generations::withdraw_canceled(&mut tx, auth.account_id)
        .await
        .map_err(ApiError::Internal)?;
    let wake = slate_workers::email::enqueue(
        &mut tx,
        auth.account_id,
        slate_workers::email::Template::DeletionScheduled,
    )
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    let renewal = slate_workers::renewal::enqueue(&mut tx, auth.account_id)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    tx.commit().await?;
    wake.send(&state.pool).await;
    renewal.send(&state.pool).await;
    Ok((
        axum::http::StatusCode::ACCEPTED,
        super::Json(json!({
            "account_id": auth.account_id,
            "deleted": true,
            "purge_after": purge_after,
            "note": "sessions and keys have ended, and subscriptions will not renew; the account can be restored until purge_after",
        })),
    )
        .into_response())
}

/// How many items a page of the export reads.
const PAGE: i64 = 500;

/// The parts of the export's body, in order.
enum Part {
    /// JSON text as it is.
    Text(String),
    /// A small section read whole when it is reached: one JSON value.
    Whole(&'static str),
    /// A long section's items, page by page (its brackets are `Text`s).
    Pages(Long, Cursor, bool),
}

/// The sections that grow with the account's use, read by keyset pages.
#[derive(Clone, Copy)]
enum Long {
    Events,
    Ledger,
    Generations,
    Audit,
}

/// Where a long section's next page starts: after a log position or an
/// audit `seq`, or after a generation's `(created_at, generation_id)`.
#[derive(Clone, Copy)]
enum Cursor {
    After(i64),
    Created(chrono::DateTime<chrono::Utc>, Uuid),
}

const BALANCE: &str =
    "select coalesce(jsonb_agg(to_jsonb(c)), '[]') from credit_accounts c where account_id = $1";
const SUBSCRIPTION: &str = "select coalesce(jsonb_agg(to_jsonb(s)), '[]') from stripe_subscriptions s where account_id = $1";
const SESSIONS: &str = "select coalesce(jsonb_agg(jsonb_build_object('session_id', session_id, 'via', via, 'created_at', created_at,
                'expires_at', expires_at, 'ended_at', ended_at)), '[]') from sessions where account_id = $1";
const KEYS: &str = "select coalesce(jsonb_agg(jsonb_build_object('key_id', key_id, 'prefix', prefix, 'label', label,
                'created_at', created_at, 'revoked_at', revoked_at)), '[]') from api_keys where account_id = $1";

/// A page of `sql`'s rows (JSON, then the number they are ordered by) for
/// `account` after `after`.
async fn numbered(
    conn: &mut sqlx::PgConnection,
    sql: &'static str,
    account: Uuid,
    after: i64,
) -> Result<Vec<(Value, Cursor)>, sqlx::Error> {
    Ok(sqlx::query_as::<_, (Value, i64)>(sqlx::AssertSqlSafe(sql))
        .bind(account)
        .bind(after)
        .bind(PAGE)
        .fetch_all(conn)
        .await?
        .into_iter()
        .map(|(v, n)| (v, Cursor::After(n)))
        .collect())
}

/// The body, part by part, while the caller's access holds.
struct Export {
    pool: PgPool,
    storage: slate_workers::storage::Storage,
    account: Uuid,
    keyring: slate_events::vault::Keyring,
    access: super::extract::Reauthorise,
    parts: std::collections::VecDeque<Part>,
}

impl Export {
    /// The next chunk of the body; `None` at its end. After an error the
    /// body ends (broken: the client sees it cut short).
    async fn next(mut self) -> Option<(Chunk, Self)> {
        loop {
            let chunk = match self.parts.pop_front()? {
                Part::Text(text) => Ok(Some(text)),
                Part::Whole(sql) => self.whole(sql).await,
                Part::Pages(long, after, first) => self.page(long, after, first).await,
            };
            match chunk {
                Ok(Some(text)) => return Some((Ok(text), self)),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the account export ends early");
                    self.parts.clear();
                    return Some((Err(e), self));
                }
            }
        }
    }

    /// Whether the caller's access still holds ([`super::extract::Reauthorise`]).
    async fn allowed(&mut self) -> Result<(), std::io::Error> {
        self.access
            .check(&self.pool)
            .await
            .map_err(std::io::Error::other)
    }

    /// A small section, whole, while the caller's access holds, its sealed
    /// fields opened (a key's label).
    async fn whole(&mut self, sql: &'static str) -> Result<Option<String>, std::io::Error> {
        self.allowed().await?;
        let read = async {
            let mut conn = self.pool.acquire().await?;
            let mut v = sqlx::query_scalar::<_, Value>(sqlx::AssertSqlSafe(sql))
                .bind(self.account)
                .fetch_one(&mut *conn)
                .await?;
            self.keyring.reveal(&mut conn, &mut v).await?;
            Ok::<_, slate_events::Error>(Some(v.to_string()))
        };
        read.await.map_err(std::io::Error::other)
    }

    /// A page of `long` after `after`, its items joined; `None` when there
    /// are no more (the section's next part follows).
    async fn page(
        &mut self,
        long: Long,
        after: Cursor,
        first: bool,
    ) -> Result<Option<String>, std::io::Error> {
        self.allowed().await?;
        let items = self
            .read(long, after)
            .await
            .map_err(std::io::Error::other)?;
        let Some(&(_, next)) = items.last() else {
            return Ok(None);
        };
        let mut chunk = String::new();
        for (i, (item, _)) in items.iter().enumerate() {
            if !(first && i == 0) {
                chunk.push(',');
            }
            chunk.push_str(&item.to_string());
        }
        self.parts.push_front(Part::Pages(long, next, false));
        Ok(Some(chunk))
    }

    async fn read(
        &mut self,
        long: Long,
        after: Cursor,
    ) -> Result<Vec<(Value, Cursor)>, slate_events::Error> {
        let mut conn = self.pool.acquire().await?;
        let account = self.account;
        let position = match after {
            Cursor::After(n) => n,
            Cursor::Created(..) => 0,
        };
        Ok(match long {
            Long::Events => slate_events::accounts::export_events_page(
                &mut conn,
                &mut self.keyring,
                account,
                position,
                PAGE,
            )
            .await?
            .into_iter()
            .map(|e| {
                let at = e["position"].as_i64().unwrap_or(i64::MAX);
                (e, Cursor::After(at))
            })
            .collect(),
            Long::Ledger => {
                numbered(
                    &mut conn,
                    "select to_jsonb(l), global_position from credit_ledger_entries l
                      where account_id = $1 and global_position > $2
                      order by global_position limit $3",
                    account,
                    position,
                )
                .await?
            }
            // What staff or an operator did comes without their address,
            // user agent and key id (theirs, not the account's); an
            // affiliate's commission is the affiliate's business.
            // The account's own requests' addresses and user agents are
            // sealed with its key: opened here.
            Long::Audit => {
                let mut rows = numbered(
                    &mut conn,
                    "select case when a.impersonator is not null or a.actor_kind in ('staff', 'operator')
                                 then to_jsonb(a) - 'seq' - 'ip' - 'user_agent' - 'api_key_id'
                                 else to_jsonb(a) - 'seq' end,
                            seq
                       from audit_entries a
                      where account_id = $1 and seq > $2
                        and action not in ('affiliate.commission_earned', 'affiliate.commission_clawed_back')
                      order by seq limit $3",
                    account,
                    position,
                )
                .await?;
                for (row, _) in &mut rows {
                    self.keyring.reveal(&mut conn, row).await?;
                }
                rows
            }
            // With prompts (opened), parameters and fresh presigned URLs.
            Long::Generations => {
                let (at, id) = match after {
                    Cursor::Created(at, id) => (at, id),
                    Cursor::After(_) => (chrono::DateTime::UNIX_EPOCH, Uuid::nil()),
                };
                let rows: Vec<(Value, Option<String>, chrono::DateTime<chrono::Utc>, Uuid)> =
                    sqlx::query_as(
                        "select (to_jsonb(g) - 'provider_handle')
                                || jsonb_build_object('prompt', i.prompt, 'parameters', i.parameters,
                                                      'webhook_url', i.webhook_url),
                                g.output_key, g.created_at, g.generation_id
                           from generations g left join generation_inputs i using (generation_id)
                          where g.account_id = $1 and (g.created_at, g.generation_id) > ($2, $3)
                          order by g.created_at, g.generation_id limit $4",
                    )
                    .bind(account)
                    .bind(at)
                    .bind(id)
                    .bind(PAGE)
                    .fetch_all(&mut *conn)
                    .await?;
                let mut page = Vec::with_capacity(rows.len());
                for (mut g, key, at, id) in rows {
                    self.keyring.reveal(&mut conn, &mut g).await?;
                    if let Some(key) = key {
                        g["output_url"] = self
                            .storage
                            .presign_get(&key, std::time::Duration::from_secs(3600))
                            .await
                            .ok()
                            .into();
                    }
                    page.push((g, Cursor::Created(at, id)));
                }
                page
            }
        })
    }
}

/// Export the account.
///
/// Everything about the account as one JSON document, streamed.
#[utoipa::path(
    get,
    path = "/v1/account/export",
    tag = "account",
    operation_id = "export_account",
    responses((
        status = 200,
        description = "The export (`Content-Disposition: attachment`); a failure mid-stream ends the body early",
        body = super::openapi::schemas::AccountExport,
    )),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn export(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Response, ApiError> {
    let account = auth.account_id;
    let mut conn = state.pool.acquire().await?;
    let profile = slate_events::accounts::get_account(&mut conn, account)
        .await?
        .ok_or_else(ApiError::not_found)?;
    drop(conn);
    let head = format!(
        "{{\"exported_at\":{},\"account\":{},\"events\":[",
        json!(chrono::Utc::now()),
        serde_json::to_string(&profile).map_err(|e| ApiError::Internal(e.into()))?
    );
    let start = Cursor::After(0);
    let export = Export {
        pool: state.pool.clone(),
        storage: state.storage.clone(),
        account,
        keyring: slate_events::vault::Keyring::only(account),
        access: super::extract::Reauthorise::new(auth, false),
        parts: [
            Part::Text(head),
            Part::Pages(Long::Events, start, true),
            Part::Text("],\"balance\":".into()),
            Part::Whole(BALANCE),
            Part::Text(",\"ledger\":[".into()),
            Part::Pages(Long::Ledger, start, true),
            Part::Text("],\"generations\":[".into()),
            Part::Pages(Long::Generations, start, true),
            Part::Text("],\"subscription\":".into()),
            Part::Whole(SUBSCRIPTION),
            Part::Text(",\"sessions\":".into()),
            Part::Whole(SESSIONS),
            Part::Text(",\"keys\":".into()),
            Part::Whole(KEYS),
            Part::Text(",\"audit\":[".into()),
            Part::Pages(Long::Audit, start, true),
            Part::Text("]}".into()),
        ]
        .into(),
    };
    let body = futures::stream::unfold(export, Export::next);
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"slate-export.json\"",
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}
