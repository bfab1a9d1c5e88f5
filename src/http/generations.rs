//! `/v1/generations`: submit, read, list, cancel.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState, Auth, ClientIp, Json, Path, Query};
use crate::generations::{self, SubmitRequest};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/generations", post(submit).get(list))
        .route("/v1/generations/{id}", get(read))
        .route("/v1/generations/{id}/cancel", post(cancel))
        .route("/v1/generations/{id}/events", get(events))
        .route("/v1/webhooks/secret", get(webhook_secret))
}

/// Submit a generation.
///
/// Rate limited, checked, priced and its credits held, then queued (202) in
/// its account's turn: accounts take turns in the queue, so one account's
/// large batch does not hold everyone else's generations back.
/// With `Idempotency-Key`, a retry of the same request answers the first
/// response again.
#[utoipa::path(
    post,
    path = "/v1/generations",
    tag = "generations",
    operation_id = "submit_generation",
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200, pattern = "^[ -~]+$", description = "1-200 printable ASCII characters (else 400); for 24 hours, the same key with the same body answers the first response, with another body 409; afterwards the key is free again")),
    request_body = SubmitRequest,
    responses((status = 202, description = "Queued", body = super::openapi::schemas::Generation)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn submit(
    State(state): State<AppState>,
    auth: Auth,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    Json(body): Json<SubmitRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = generations::idempotency_key(&headers)?;
    let (status, body) = generations::submit(&state, &auth, ip, key, body).await?;
    Ok((status, Json(body)))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse().map_err(|_| ApiError::not_found())
}

/// A generation.
///
/// Status, attempts, cost, and its output with a presigned URL valid for 15
/// minutes.
#[utoipa::path(
    get,
    path = "/v1/generations/{id}",
    tag = "generations",
    operation_id = "get_generation",
    params(("id" = Uuid, Path, description = "The generation's id")),
    responses((status = 200, description = "The generation", body = super::openapi::schemas::Generation)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn read(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = super::scoped::scoped(&state.pool, auth.account_id).await?;
    let g = slate_events::generations::get(&mut conn, auth.account_id, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    drop(conn);
    Ok(Json(generations::view(&state, &g).await))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct Page {
    /// `next_cursor` of the previous page (with the same filters); empty or
    /// absent for the first.
    cursor: Option<String>,
    /// 1 to 100 (default 20; empty is the default).
    #[serde(default, deserialize_with = "super::extract::empty_is_none")]
    limit: Option<i64>,
    /// Only those with this status: queued, running, succeeded, failed or
    /// canceled.
    status: Option<String>,
    /// Only those of this kind: video, voiceover, transcription or script.
    kind: Option<String>,
    /// Only those of this collection.
    collection_id: Option<String>,
}

/// List generations.
///
/// The account's generations, newest first, optionally only those of one
/// status, kind or collection (a parameter not listed here is 400
/// `invalid_query`, not ignored).
#[utoipa::path(
    get,
    path = "/v1/generations",
    tag = "generations",
    operation_id = "list_generations",
    params(Page),
    responses((status = 200, description = "A page of generations", body = super::openapi::schemas::GenerationPage)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(20).clamp(1, 100);
    // An empty value is no filter (`?status=&kind=video`).
    let given = |v: Option<String>| v.filter(|v| !v.is_empty());
    let filter = slate_events::generations::ListFilter {
        status: given(page.status),
        kind: given(page.kind),
        collection_id: given(page.collection_id),
    };
    let known =
        |v: &Option<String>, known: &[&str]| v.as_deref().is_none_or(|v| known.contains(&v));
    if !known(&filter.status, slate_events::generations::STATUSES)
        || !known(&filter.kind, slate_events::generations::KINDS)
    {
        return Err(ApiError::bad_request(
            "invalid_query",
            "status is queued, running, succeeded, failed or canceled; kind is video, voiceover, transcription or script",
        ));
    }
    let mut conn = super::scoped::scoped(&state.pool, auth.account_id).await?;
    let after = match &given(page.cursor) {
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
        slate_events::generations::list(&mut conn, auth.account_id, &filter, after, limit + 1)
            .await?;
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

/// Cancel a generation.
///
/// A queued generation ends canceled and its credits are released (200); a
/// running one is asked to stop (202).
#[utoipa::path(
    post,
    path = "/v1/generations/{id}/cancel",
    tag = "generations",
    operation_id = "cancel_generation",
    params(("id" = Uuid, Path, description = "The generation's id")),
    responses(
        (status = 200, description = "Canceled", body = super::openapi::schemas::Generation),
        (status = 202, description = "Cancel requested of the running generation", body = super::openapi::schemas::Generation),
    ),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn cancel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let (status, body) = generations::cancel(&state, &auth, id).await?;
    Ok((status, Json(body)))
}

/// Follow a generation.
///
/// Server-Sent Events, one per status change, ids = the generation stream's
/// versions, resumable with `Last-Event-ID`; ends after the terminal event.
#[utoipa::path(
    get,
    path = "/v1/generations/{id}/events",
    tag = "generations",
    operation_id = "follow_generation",
    params(
        ("id" = Uuid, Path, description = "The generation's id"),
        ("Last-Event-ID" = Option<i32>, Header, minimum = 0, description = "Resume after this event id (else 400)"),
    ),
    responses((
        status = 200,
        description = "Server-Sent Events named `status`, each `data` a JSON `GenerationStatusEvent`; the stream ends after the terminal event or 15 minutes (resume with `Last-Event-ID`), and within seconds of the key, session or impersonation that opened it being revoked or ended",
        content_type = "text/event-stream",
        body = super::openapi::schemas::GenerationStatusEvent,
    ), (
        status = 204,
        description = "Resumed (`Last-Event-ID`) at or after the terminal event: nothing more will come (a browser's `EventSource` stops reconnecting)",
    )),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn events(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let mut conn = state.pool.acquire().await?;
    let g = slate_events::generations::get(&mut conn, auth.account_id, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let stream_id = format!("generation-{id}");
    // Finished already: the stream ends with its terminal event (a client
    // resuming after it gets nothing more, at once, rather than a stream
    // that stays open for nothing and is resumed again).
    let end: Option<i32> = if g.is_terminal() {
        sqlx::query_scalar(
            "select max(stream_version) from events
              where stream_id = $1
                and event_type in ('GenerationSucceeded', 'GenerationFailed', 'GenerationCanceled')",
        )
        .bind(&stream_id)
        .fetch_one(&mut *conn)
        .await?
    } else {
        None
    };
    drop(conn);
    let after = last_event_id(&headers)?;
    if end.is_some_and(|end| after >= end) {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let follow = Follow {
        pool: state.pool.clone(),
        wake: state.hub.subscribe(),
        stream_id,
        after,
        pending: std::collections::VecDeque::new(),
        finished: false,
        until: tokio::time::Instant::now() + STREAM_FOR,
        access: super::extract::Reauthorise::new(auth, false),
    };
    let stream = futures::stream::unfold(follow, |mut f| async move {
        f.next()
            .await
            .map(|e| (Ok::<_, std::convert::Infallible>(e), f))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}

/// The completion-webhook signing secret.
///
/// The account's `whsec_` secret (made on first use); completion webhooks
/// are signed the Standard Webhooks way.
#[utoipa::path(
    get,
    path = "/v1/webhooks/secret",
    tag = "generations",
    operation_id = "get_webhook_secret",
    responses((status = 200, description = "The secret", body = super::openapi::schemas::WebhookSecret)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn webhook_secret(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Value>, ApiError> {
    auth.not_impersonated()?;
    let mut conn = state.pool.acquire().await?;
    let secret = slate_workers::webhooks::secret_for(&mut conn, auth.account_id).await?;
    Ok(Json(json!({
        "secret": secret,
        "scheme": "Standard Webhooks: webhook-signature = v1,base64(HMAC-SHA256(base64-decoded secret, id.timestamp.body))",
    })))
}

/// The event id a stream resumes after: 0 (from the start) without
/// `Last-Event-ID`. One that is not an id this stream gives (a non-negative
/// integer) is 400 `invalid_last_event_id`; it used to replay the stream
/// from the start, as if absent.
fn last_event_id(headers: &HeaderMap) -> Result<i32, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|id| *id >= 0)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_last_event_id",
                "Last-Event-ID is an event id this stream gave",
            )
        })
}

/// How long one stream stays open; clients resume with Last-Event-ID.
const STREAM_FOR: std::time::Duration = std::time::Duration::from_secs(15 * 60);

struct Follow {
    pool: sqlx::PgPool,
    wake: tokio::sync::broadcast::Receiver<()>,
    stream_id: String,
    after: i32,
    pending: std::collections::VecDeque<SseEvent>,
    finished: bool,
    until: tokio::time::Instant,
    /// A revoked key, an ended session or impersonation, or a deleted
    /// account ends the stream.
    access: super::extract::Reauthorise,
}

impl Follow {
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.finished || tokio::time::Instant::now() > self.until {
                return None;
            }
            self.access.check(&self.pool).await.ok()?;
            let rows: Vec<(i32, String, Value, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
                "select stream_version, event_type, payload, recorded_at from events
                  where stream_id = $1 and stream_version > $2 order by stream_version",
            )
            .bind(&self.stream_id)
            .bind(self.after)
            .fetch_all(&self.pool)
            .await
            .ok()?;
            for (version, event_type, payload, at) in rows {
                // Nothing after the end (a start recorded by an older
                // worker after a cancellation).
                if self.finished {
                    break;
                }
                self.after = version;
                let (status, terminal) = match event_type.as_str() {
                    "GenerationRequested" => ("queued", false),
                    "GenerationSucceeded" => ("succeeded", true),
                    "GenerationFailed" => ("failed", true),
                    "GenerationCanceled" => ("canceled", true),
                    _ => ("running", false),
                };
                let mut data = json!({ "status": status, "event": event_type, "at": at });
                for field in ["attempt", "reason_code", "reason", "content_type", "bytes"] {
                    if let Some(v) = payload.get(field) {
                        data[field] = v.clone();
                    }
                }
                self.pending.push_back(
                    SseEvent::default()
                        .id(version.to_string())
                        .event("status")
                        .data(data.to_string()),
                );
                self.finished |= terminal;
            }
            if self.pending.is_empty() {
                // Wait for the log's tail to move (or look again after a
                // second: a commit behind the tail does not move it).
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(1), self.wake.recv()).await;
            }
        }
    }
}
