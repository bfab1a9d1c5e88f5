//! `GET /v1/account/export`: everything about the account as one JSON
//! bundle, streamed section by section and page by page (never built in
//! memory): profile, its events, ledger, generations with fresh presigned
//! URLs, subscription, sessions and keys (prefixes only), and the audit
//! entries about it.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
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

/// The account's events: its own streams and every event naming it.
/// One page of the account's events, personal fields opened (the email in
/// `AccountCreated` is sealed in the log); the keyring lives across pages.
/// What staff or an operator did (a read, an impersonated request, a
/// restore) comes without their address, user agent and key id: those are
/// the staff member's, not the account's, to receive.
async fn events_page(
    pool: &PgPool,
    keyring: &mut slate_events::vault::Keyring,
    account: Uuid,
    after: i64,
) -> Result<Vec<Value>, slate_events::Error> {
    let mut conn = pool.acquire().await?;
    let mut page: Vec<Value> = sqlx::query_scalar(
        "select jsonb_build_object('position', global_position, 'event_id', event_id, 'stream_id', stream_id,
                'version', stream_version, 'type', event_type, 'schema_version', schema_version,
                'payload', payload,
                'metadata', case when metadata ? 'impersonator'
                                   or metadata->'actor'->>'kind' in ('staff', 'operator')
                                 then metadata - 'ip' - 'user_agent' - 'api_key_id'
                                 else metadata end,
                'recorded_at', recorded_at)
           from events
          where global_position > $2
            and (payload->>'account_id' = $1::text or stream_id = 'account-' || $1::text)
            -- An affiliate's commission on this account's payments is the
            -- affiliate's business (its rate shows in it), not the account's.
            and event_type not in ('CommissionEarned', 'CommissionClawedBack')
          order by global_position limit 500",
    )
    .bind(account)
    .bind(after)
    .fetch_all(&mut *conn)
    .await?;
    for e in &mut page {
        keyring.reveal(&mut conn, e).await?;
    }
    Ok(page)
}

async fn section(
    pool: &PgPool,
    sql: &'static str,
    account: Uuid,
) -> Result<Value, slate_events::Error> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(account)
        .fetch_one(pool)
        .await?)
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
    let pool = state.pool.clone();
    let head = format!(
        "{{\"exported_at\":{},\"account\":{},\"events\":[",
        json!(chrono::Utc::now()),
        serde_json::to_string(&profile).map_err(|e| ApiError::Internal(e.into()))?
    );
    // The events, page by page, while the caller's access holds.
    let events = futures::stream::unfold(
        (
            pool.clone(),
            slate_events::vault::Keyring::default(),
            0i64,
            true,
            super::extract::Reauthorise::new(auth, false),
        ),
        move |(pool, mut keyring, after, first, mut access)| async move {
            if let Err(e) = access.check(&pool).await {
                return Some((
                    Err(std::io::Error::other(e)),
                    (pool, keyring, i64::MAX, false, access),
                ));
            }
            match events_page(&pool, &mut keyring, account, after).await {
                Ok(page) if page.is_empty() => None,
                Ok(page) => {
                    let last = page
                        .last()
                        .and_then(|e| e["position"].as_i64())
                        .unwrap_or(after);
                    let mut chunk = String::new();
                    for (i, e) in page.iter().enumerate() {
                        if !(first && i == 0) {
                            chunk.push(',');
                        }
                        chunk.push_str(&e.to_string());
                    }
                    Some((
                        Ok::<_, std::io::Error>(chunk),
                        (pool, keyring, last, false, access),
                    ))
                }
                Err(e) => Some((
                    Err(std::io::Error::other(e)),
                    (pool, keyring, i64::MAX, false, access),
                )),
            }
        },
    );
    // The other sections, each small enough to read whole.
    let storage = state.storage.clone();
    let rest = futures::stream::once(async move {
        let sections = async {
            let ledger = section(&pool,
                "select coalesce(jsonb_agg(to_jsonb(l) order by global_position), '[]') from credit_ledger_entries l where account_id = $1",
                account).await?;
            let balance = section(&pool,
                "select coalesce(jsonb_agg(to_jsonb(c)), '[]') from credit_accounts c where account_id = $1", account).await?;
            let subscription = section(&pool,
                "select coalesce(jsonb_agg(to_jsonb(s)), '[]') from stripe_subscriptions s where account_id = $1", account).await?;
            let sessions = section(&pool,
                "select coalesce(jsonb_agg(jsonb_build_object('session_id', session_id, 'via', via, 'created_at', created_at,
                        'expires_at', expires_at, 'ended_at', ended_at)), '[]') from sessions where account_id = $1", account).await?;
            let keys = section(&pool,
                "select coalesce(jsonb_agg(jsonb_build_object('key_id', key_id, 'prefix', prefix, 'label', label,
                        'created_at', created_at, 'revoked_at', revoked_at)), '[]') from api_keys where account_id = $1", account).await?;
            let audit = section(&pool,
                "select coalesce(jsonb_agg(case when a.impersonator is not null or a.actor_kind in ('staff', 'operator')
                                                then to_jsonb(a) - 'seq' - 'ip' - 'user_agent' - 'api_key_id'
                                                else to_jsonb(a) - 'seq' end
                                           order by seq), '[]')
                   from audit_entries a
                  where account_id = $1
                    and action not in ('affiliate.commission_earned', 'affiliate.commission_clawed_back')",
                account).await?;
            let generations: Vec<(Value, Option<String>)> = sqlx::query_as(
                "select (to_jsonb(g) - 'provider_handle')
                        || jsonb_build_object('prompt', i.prompt, 'parameters', i.parameters, 'webhook_url', i.webhook_url),
                        g.output_key
                   from generations g left join generation_inputs i using (generation_id)
                  where g.account_id = $1 order by g.created_at",
            )
            .bind(account)
            .fetch_all(&pool)
            .await?;
            let mut with_urls = Vec::with_capacity(generations.len());
            let mut conn = pool.acquire().await?;
            let mut keyring = slate_events::vault::Keyring::default();
            for (mut g, key) in generations {
                keyring.reveal(&mut conn, &mut g).await?;
                if let Some(key) = key {
                    g["output_url"] = storage
                        .presign_get(&key, std::time::Duration::from_secs(3600))
                        .await
                        .ok()
                        .into();
                }
                with_urls.push(g);
            }
            Ok::<_, slate_events::Error>(format!(
                "],\"balance\":{},\"ledger\":{},\"generations\":{},\"subscription\":{},\"sessions\":{},\"keys\":{},\"audit\":{}}}",
                balance,
                ledger,
                Value::Array(with_urls),
                subscription,
                sessions,
                keys,
                audit
            ))
        };
        sections.await.map_err(std::io::Error::other)
    });
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(head) })
        .chain(events)
        .chain(rest)
        .map(|c: Chunk| c);
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
