//! Receive one webhook delivery: verify, read, check mode, mirror.

use slate_events::catalog::StripeSource;
use slate_events::stripe::IncomingEvent;

use super::signature::{self, SignatureError};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("webhook secrets are not configured")]
    NotConfigured,
    #[error("the body is not a Stripe event")]
    Unparseable,
    #[error("the event's livemode does not match this deployment")]
    LivemodeMismatch,
    #[error("storing the event failed")]
    Store(#[source] anyhow::Error),
}

/// Verify and store one delivery (committed together with the deliveries
/// that arrive at the same time, [`slate_workers::stripe::IngestBatcher`]).
/// Returns whether it was the first delivery.
pub async fn receive(
    ingest: &slate_workers::stripe::IngestBatcher,
    config: &Config,
    signature_header: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<bool, WebhookError> {
    if config.stripe_webhook_secrets.is_empty() {
        return Err(WebhookError::NotConfigured);
    }
    signature::verify(signature_header, body, &config.stripe_webhook_secrets, now)?;
    let raw = std::str::from_utf8(body).map_err(|_| WebhookError::Unparseable)?;

    let parse_error = typed_parse_error(raw);
    let event = IncomingEvent::from_raw(raw, parse_error).ok_or(WebhookError::Unparseable)?;
    if event.livemode != config.livemode {
        return Err(WebhookError::LivemodeMismatch);
    }
    if let Some(reason) = &event.parse_error {
        tracing::warn!(
            stripe_event_id = %event.stripe_event_id,
            event_type = %event.event_type,
            api_version = event.api_version.as_deref().unwrap_or("-"),
            %reason,
            "stripe event mirrored unparsed"
        );
    }
    ingest
        .submit((event, StripeSource::Webhook))
        .await
        .map_err(WebhookError::Store)
}

/// Why async-stripe's typed parser cannot read this event, if it cannot.
/// (Its own signature and time checks pass by construction: we sign with a
/// throwaway key at the current time; authenticity was established before.)
pub fn typed_parse_error(raw: &str) -> Option<String> {
    const PARSE_ONLY_KEY: &str = "whsec_parse_only";
    let t = chrono::Utc::now().timestamp();
    let header = signature::sign(PARSE_ONLY_KEY, t, raw.as_bytes());
    match stripe_webhook::Webhook::construct_event_with_timestamp(raw, &header, PARSE_ONLY_KEY, t) {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}
