//! Submitting and reading generations: the service behind the routes.
//! Authenticate → rate limit → deny-list → (one transaction:) idempotency,
//! price, reserve, `GenerationRequested`, job.

use std::net::IpAddr;
use std::time::Duration;

use axum::http::StatusCode;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use slate_events::generations::{self, Generation, Submission, Submitted};
use slate_events::moderation;
use uuid::Uuid;

use crate::http::{ApiError, AppState, Auth};

const MAX_PROMPT_CHARS: usize = 4000;
const OUTPUT_URL_TTL: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "kind": "video",
    "provider": "fal",
    "prompt": "a red fox crossing fresh snow at dawn",
    "parameters": {"model": "fal-ai/kling-video/v2.1/master/text-to-video", "duration": 5},
    "collection_id": "trailers",
    "deadline_seconds": 3600
}))]
pub struct SubmitRequest {
    /// video, voiceover, transcription or script.
    #[schema(value_type = crate::http::openapi::schemas::GenerationKind)]
    pub kind: String,
    /// One of the providers this deployment offers.
    pub provider: String,
    /// Needed for video, voiceover and script; at most 4000 characters.
    #[serde(default)]
    pub prompt: Option<String>,
    /// An object of the account's own (`users/<account>/…`) as input, for
    /// transcription.
    #[serde(default)]
    pub input_key: Option<String>,
    /// Provider parameters (an object); a video's `duration` is 1 to 60
    /// seconds (default 5) and priced per second; Seedance's video is priced
    /// by its `resolution` too (480p, 720p or 1080p; default 1080p).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Value,
    /// 1-64 letters, digits, - or _ (default `default`).
    #[serde(default)]
    pub collection_id: Option<String>,
    /// Cancel unbilled if not finished within this many seconds.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub deadline_seconds: Option<u32>,
    /// Told the terminal status, signed the Standard Webhooks way.
    #[serde(default)]
    pub webhook_url: Option<String>,
}

fn invalid(code: &'static str, message: &'static str) -> ApiError {
    ApiError::unprocessable(code, message)
}

/// The checks of a submission that need no database: its collection and
/// priced units, or the refusal. `providers` are the offered providers'
/// names, `account_id` the submitter's.
pub(crate) fn validate(
    providers: &[String],
    account_id: Uuid,
    r: &SubmitRequest,
) -> Result<(String, i32), ApiError> {
    if !generations::KINDS.contains(&r.kind.as_str()) {
        return Err(invalid(
            "invalid_kind",
            "kind is one of video, voiceover, transcription, script",
        ));
    }
    if providers.iter().all(|p| p != &r.provider) {
        return Err(invalid(
            "unknown_provider",
            "this provider is not available",
        ));
    }
    let collection = r
        .collection_id
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    if collection.is_empty()
        || collection.len() > 64
        || !collection
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            "invalid_collection",
            "collection_id is 1-64 letters, digits, - or _",
        ));
    }
    match (&r.prompt, &r.input_key, r.kind.as_str()) {
        (_, None, "transcription") => {
            return Err(invalid("input_required", "a transcription needs input_key"));
        }
        (None, _, "video" | "voiceover" | "script") => {
            return Err(invalid("prompt_required", "this kind needs a prompt"));
        }
        _ => {}
    }
    if let Some(p) = &r.prompt
        && (p.trim().is_empty() || p.chars().count() > MAX_PROMPT_CHARS)
    {
        return Err(invalid(
            "invalid_prompt",
            "the prompt is empty or longer than 4000 characters",
        ));
    }
    // An object key is at most 1,024 bytes: a longer one names nothing, and
    // the storage refuses to look it up (which read as an outage, 503).
    if let Some(key) = &r.input_key
        && (!key.starts_with(&slate_workers::storage::account_prefix(account_id))
            || key.contains("..")
            || key.len() > 1024)
    {
        return Err(invalid(
            "invalid_input",
            "input_key must name one of your own objects",
        ));
    }
    if !(r.parameters.is_null() || r.parameters.is_object()) {
        return Err(invalid(
            "invalid_parameters",
            "parameters must be an object",
        ));
    }
    if r.deadline_seconds == Some(0) {
        return Err(invalid(
            "invalid_deadline",
            "deadline_seconds must be positive",
        ));
    }
    // Priced per second for video, per generation otherwise.
    let units = if r.kind == "video" {
        match r.parameters.get("duration") {
            None => 5,
            Some(d) => d
                .as_i64()
                .or_else(|| d.as_str().and_then(|s| s.parse().ok()))
                .filter(|d| (1..=60).contains(d))
                .ok_or_else(|| invalid("invalid_parameters", "duration is 1 to 60 seconds"))?
                as i32,
        }
    } else {
        1
    };
    Ok((collection, units))
}

/// The `Idempotency-Key` header, if any: 1-200 printable ASCII characters
/// (spaces included).
/// (One that is not readable as such is refused, not taken for no key: a
/// retry would then be a second generation, charged again.)
pub(crate) fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key)
            if !key.is_empty()
                && key.len() <= 200
                && key.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) =>
        {
            Ok(Some(key))
        }
        _ => Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key is 1-200 printable ASCII characters",
        )),
    }
}

/// The answer already given to the request under `key`, if there is one
/// (409 when `key` came with another request).
async fn replay(
    conn: &mut sqlx::PgConnection,
    account_id: Uuid,
    key: &str,
    request_hash: &[u8],
) -> Result<Option<(StatusCode, Value)>, ApiError> {
    let row: Option<(Vec<u8>, Option<i32>, Option<Value>)> = sqlx::query_as(
        "select request_hash, status_code, response from idempotency_keys
          where account_id = $1 and key = $2 and created_at > now() - $3",
    )
    .bind(account_id)
    .bind(key)
    .bind(generations::IDEMPOTENCY_KEY_TTL)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((hash, status, response)) = row else {
        return Ok(None);
    };
    if hash != request_hash {
        return Err(ApiError::conflict(
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request",
        ));
    }
    Ok(match (status, response) {
        (Some(status), Some(response)) => Some((
            StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK),
            response,
        )),
        _ => None,
    })
}

/// What an `Idempotency-Key` retry is compared by: the submission's hash.
pub(crate) fn request_hash(req: &SubmitRequest) -> Result<Vec<u8>, ApiError> {
    let bytes = serde_json::to_vec(req).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(Sha256::digest(bytes).to_vec())
}

async fn limit(state: &AppState, scope: &str, id: &str, per_minute: u32) -> Result<(), ApiError> {
    state
        .limiter
        .hit(scope, id, per_minute, 60)
        .await
        .allowed("too many submissions; try again after Retry-After seconds")
}

#[tracing::instrument(skip_all, fields(account_id = %auth.account_id, kind = %req.kind, provider = %req.provider))]
pub async fn submit(
    state: &AppState,
    auth: &Auth,
    client_ip: Option<IpAddr>,
    idempotency_key: Option<&str>,
    req: SubmitRequest,
) -> Result<(StatusCode, Value), ApiError> {
    limit(
        state,
        "account",
        &auth.account_id.to_string(),
        state.config.rate_limit_account,
    )
    .await?;
    if let Some(ip) = client_ip {
        limit(state, "ip", &ip.to_string(), state.config.rate_limit_ip).await?;
    }
    // A retry of a request already answered gets that answer, whatever has
    // changed since (the deployment's providers, models or deny-list, the
    // webhook host's DNS): checked again, it could be refused (and a
    // rejected prompt recorded) while its generation runs.
    let request_hash = request_hash(&req)?;
    if let Some(key) = idempotency_key {
        let mut conn = state.pool.acquire().await?;
        if let Some(answer) = replay(&mut conn, auth.account_id, key, &request_hash).await? {
            return Ok(answer);
        }
    }
    let (collection_id, units) = validate(&state.provider_names, auth.account_id, &req)?;
    let tier =
        slate_workers::providers::price_tier(&req.provider, &req.parameters).map_err(|_| {
            invalid(
                "invalid_parameters",
                "resolution is one of 480p, 720p, 1080p",
            )
        })?;
    if state
        .providers
        .get(&req.provider)
        .is_some_and(|p| !p.offers_model(&req.parameters))
    {
        return Err(invalid(
            "model_not_offered",
            "this provider does not offer that model here",
        ));
    }
    // A key naming nothing used to be accepted, its credits held, and fail
    // at its attempt (`input_unavailable`).
    if let Some(key) = &req.input_key {
        match state.storage.exists(key).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(invalid(
                    "input_not_found",
                    "input_key names no stored object",
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "storage out of reach while checking an input");
                return Err(ApiError::Unavailable {
                    code: "storage_unavailable",
                    message: "the storage could not be reached; nothing was done, retry later",
                });
            }
        }
    }
    if let Some(url) = &req.webhook_url {
        slate_workers::webhooks::check_url(url, &state.config.webhook_allowlist)
            .await
            .map_err(|_| {
                invalid(
                    "webhook_url_not_allowed",
                    "webhook_url must be an http(s) URL resolving to a public address",
                )
            })?;
    }
    let metadata = auth.metadata();

    if let Some(prompt) = &req.prompt
        && let Some(category) = state.config.denylist.check(prompt)
    {
        let category = category.to_owned();
        let mut conn = state.pool.acquire().await?;
        generations::record_prompt_rejection(
            &mut conn,
            auth.account_id,
            &category,
            &moderation::prompt_sha256(prompt),
            metadata,
        )
        .await?;
        tracing::info!(%category, "prompt rejected by the deny-list");
        return Err(invalid("prompt_rejected", "the prompt is not allowed")
            .with_details(json!({ "category": category })));
    }

    let mut tx = state.pool.begin().await?;
    if let Some(key) = idempotency_key {
        // An expired key (not yet deleted by the sweep) is taken over.
        let inserted = sqlx::query(
            "insert into idempotency_keys (account_id, key, request_hash) values ($1, $2, $3)
             on conflict (account_id, key) do update
                set request_hash = excluded.request_hash, status_code = null, response = null,
                    created_at = excluded.created_at
              where idempotency_keys.created_at <= now() - $4",
        )
        .bind(auth.account_id)
        .bind(key)
        .bind(&request_hash)
        .bind(generations::IDEMPOTENCY_KEY_TTL)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        // Answered meanwhile by a request with the same key (the insert
        // waited for its commit).
        if !inserted
            && let Some(answer) = replay(&mut tx, auth.account_id, key, &request_hash).await?
        {
            return Ok(answer);
        }
    }

    let generation_id = Uuid::now_v7();
    let submission = Submission {
        generation_id,
        account_id: auth.account_id,
        kind: req.kind.clone(),
        provider: req.provider.clone(),
        tier: tier.map(str::to_owned),
        units,
        collection_id,
        prompt: req.prompt.clone(),
        input_key: req.input_key.clone(),
        parameters: if req.parameters.is_null() {
            json!({})
        } else {
            req.parameters.clone()
        },
        webhook_url: req.webhook_url.clone(),
        deadline: req
            .deadline_seconds
            .map(|s| Utc::now() + chrono::Duration::seconds(s.into())),
        hold_until: Utc::now()
            + chrono::Duration::from_std(state.config.generation_hold)
                .unwrap_or(chrono::Duration::hours(2)),
    };
    let (outcome, wake) = slate_workers::generations::submit(
        &mut tx,
        &submission,
        &metadata,
        state.config.generation_attempts,
    )
    .await
    .map_err(|e| match e.downcast_ref::<slate_events::Error>() {
        Some(slate_events::Error::OperationNotApproved) => invalid(
            "operation_not_priced",
            "this kind of generation has no approved price with this provider",
        ),
        // The price's own bounds (`approved_operations.max_units`): a video
        // longer than this provider makes.
        Some(slate_events::Error::InvalidArgument(m)) if m.starts_with("units of ") => invalid(
            "invalid_parameters",
            "more units than this provider makes (a video longer than its longest)",
        ),
        _ => ApiError::Internal(e),
    })?;
    match outcome {
        Submitted::Insufficient {
            available,
            shortfall,
        } => {
            tx.rollback().await?;
            Err(ApiError::client(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_credits",
                "not enough credits for this generation",
            )
            .with_details(json!({ "available": available, "shortfall": shortfall })))
        }
        // Deleted after this request was authenticated: as if the key or
        // session had ended a moment sooner.
        Submitted::AccountDeleted => {
            tx.rollback().await?;
            Err(ApiError::unauthorized())
        }
        Submitted::Accepted { .. } => {
            let g = generations::get(&mut tx, auth.account_id, generation_id)
                .await?
                .ok_or_else(|| {
                    ApiError::Internal(anyhow::anyhow!("generation not visible after insert"))
                })?;
            let body = view(state, &g).await;
            if let Some(key) = idempotency_key {
                sqlx::query(
                    "update idempotency_keys set status_code = 202, response = $3 where account_id = $1 and key = $2",
                )
                .bind(auth.account_id)
                .bind(key)
                .bind(&body)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            wake.send(&state.pool).await;
            Ok((StatusCode::ACCEPTED, body))
        }
    }
}

/// A generation as its owner sees it, with a short-lived URL to its output.
pub async fn view(state: &AppState, g: &Generation) -> Value {
    let output = match (&g.output_key, g.status.as_str()) {
        (Some(key), "succeeded") => {
            let url = state.storage.presign_get(key, OUTPUT_URL_TTL).await.ok();
            json!({
                "url": url,
                "expires_at": url.as_ref().map(|_| Utc::now() + chrono::Duration::from_std(OUTPUT_URL_TTL).unwrap_or_default()),
                "content_type": g.output_content_type,
                "bytes": g.output_bytes,
                "width": g.width,
                "height": g.height,
                "duration_ms": g.duration_ms,
                "key": key,
            })
        }
        _ => Value::Null,
    };
    json!({
        "id": g.generation_id,
        "kind": g.kind,
        "provider": g.provider,
        "status": g.status,
        "attempts": g.attempts,
        "cost": g.cost,
        "collection_id": g.collection_id,
        "cancel_requested": g.cancel_requested,
        "deadline": g.deadline,
        "failure_code": g.failure_code,
        "output": output,
        "created_at": g.created_at,
        "updated_at": g.updated_at,
    })
}

/// Cancel: a queued generation ends canceled and released at once, and its
/// job gives its turn back; a running one is asked to stop (its worker calls
/// the provider's cancel).
pub async fn cancel(
    state: &AppState,
    auth: &Auth,
    id: Uuid,
) -> Result<(StatusCode, Value), ApiError> {
    let mut tx = state.pool.begin().await?;
    generations::lock(&mut tx, id).await?;
    let g = generations::get(&mut tx, auth.account_id, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let metadata = auth.metadata();
    let mut wake = slate_workers::jobs::Wake::none();
    let status = match g.status.as_str() {
        "queued" => {
            if generations::cancel_now(&mut tx, &g, "canceled", &metadata).await? {
                wake = slate_workers::webhooks::enqueue_for(&mut tx, id)
                    .await
                    .map_err(ApiError::Internal)?;
                slate_workers::generations::withdraw(&mut tx, &g)
                    .await
                    .map_err(ApiError::Internal)?;
            }
            StatusCode::OK
        }
        "running" => {
            generations::request_cancel(&mut tx, &g, &metadata).await?;
            StatusCode::ACCEPTED
        }
        _ => {
            return Err(ApiError::conflict(
                "generation_finished",
                "the generation has already finished",
            ));
        }
    };
    let g = generations::get(&mut tx, auth.account_id, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    tx.commit().await?;
    wake.send(&state.pool).await;
    Ok((status, view(state, &g).await))
}
