//! `POST /webhooks/stripe`: verified deliveries are mirrored and queued
//! before the 2xx; nothing else is done in the request.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::stripe::signature::SignatureError;
use crate::stripe::webhook::{self, WebhookError};

/// Stripe's events are far smaller; anything bigger is not from Stripe.
pub const BODY_LIMIT: usize = 1024 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks/stripe", post(receive))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

/// Receive a Stripe webhook delivery.
///
/// Verified against `Stripe-Signature`, mirrored, logged and queued before
/// the 2xx; duplicates are acknowledged.
#[utoipa::path(
    post,
    path = "/webhooks/stripe",
    tag = "webhooks",
    operation_id = "receive_stripe_webhook",
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature of the raw body")),
    request_body(content = Object, content_type = "application/json", description = "A Stripe event, exactly as Stripe sent it (at most 1 MiB)"),
    responses((status = 200, description = "Received (and queued when new)", body = super::openapi::schemas::WebhookReceipt)),
)]
pub(super) async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|_| ApiError::payload_too_large())?;
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    let first = webhook::receive(&state.stripe_ingest, &state.config, signature, &body, now)
        .await
        .map_err(to_api_error)?;
    state.stripe_deliveries.record(first);
    Ok(Json(json!({ "received": true, "duplicate": !first })))
}

fn to_api_error(e: WebhookError) -> ApiError {
    let bad = ApiError::bad_request;
    match e {
        WebhookError::Signature(s) => bad(
            s.code(),
            match s {
                SignatureError::Missing => "the Stripe-Signature header is missing",
                SignatureError::Malformed => "the Stripe-Signature header is malformed",
                SignatureError::NoMatch => "no signature matches the payload",
                SignatureError::OutOfTolerance => {
                    "the signature timestamp is outside the tolerance"
                }
            },
        ),
        WebhookError::Unparseable => bad("body_unparseable", "the body is not a Stripe event"),
        WebhookError::LivemodeMismatch => bad(
            "livemode_mismatch",
            "the event's livemode does not match this deployment",
        ),
        WebhookError::ConnectedAccount => bad(
            "connected_account_event",
            "the event is a connected account's, not this account's",
        ),
        WebhookError::NotConfigured => ApiError::Unavailable {
            code: "webhooks_not_configured",
            message: "no webhook secret is configured",
        },
        WebhookError::Store(e) => ApiError::Internal(e),
    }
}
