//! `slate stripe reconcile`: list events from Stripe's Events API and ingest
//! the ones the webhook never delivered, through the same path (mirror, log,
//! job), marked as reconciled. Safe to run any number of times.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use slate_events::catalog::StripeSource;
use slate_events::stripe::IncomingEvent;
use sqlx::PgPool;
use stripe_client_core::{CustomizedStripeRequest, StripeClient, StripeRequest};
use stripe_core::event::ListEvent;

/// Stripe keeps events for 30 days.
pub const RETENTION_DAYS: i64 = 30;

/// A client that keeps the raw bytes of the last response, so events are
/// mirrored exactly as Stripe sent them.
struct Capture<'a> {
    inner: &'a stripe::Client,
    last: Mutex<Option<Bytes>>,
}

impl StripeClient for Capture<'_> {
    type Err = stripe::StripeError;

    async fn execute(&self, req: CustomizedStripeRequest) -> Result<Bytes, Self::Err> {
        let bytes = self.inner.execute(req).await?;
        *self.last.lock().expect("not poisoned") = Some(bytes.clone());
        Ok(bytes)
    }
}

/// How a staff member or an operator replays an event: forced, and asking
/// Stripe where processing is in doubt (a failed refund's charge, an invoice
/// without its payments), as the worker does.
pub fn replay_options(client: Option<stripe::Client>) -> slate_events::stripe::ProcessOptions {
    slate_events::stripe::ProcessOptions {
        force: true,
        refetch: client.map(refetcher),
        ..Default::default()
    }
}

/// Ask Stripe's API what processing is in doubt about (see
/// `slate_events::stripe::Refetch`): a subscription, an invoice with its
/// payments (`payments` is includable: Stripe's events of API versions
/// since 2025-03-31 do not carry it, and it is where the payment intent a
/// refund or dispute names is), a charge with its refunds (includable too),
/// when one of them failed, or a page of an invoice's lines.
pub fn refetcher(client: stripe::Client) -> slate_events::stripe::Refetcher {
    use slate_events::stripe::Refetch;
    use stripe_client_core::{RequestBuilder, StripeMethod};

    #[derive(serde::Serialize)]
    struct Expand {
        expand: [&'static str; 1],
    }
    #[derive(serde::Serialize)]
    struct LinesPage<'a> {
        limit: u8,
        #[serde(skip_serializing_if = "Option::is_none")]
        starting_after: Option<&'a str>,
    }
    use super::is_id;
    let client = std::sync::Arc::new(client);
    std::sync::Arc::new(move |what: Refetch| {
        let client = client.clone();
        Box::pin(async move {
            let request = match &what {
                Refetch::Object(id) if !is_id(id) => return None,
                Refetch::Object(id) if id.starts_with("sub_") => {
                    stripe_billing::subscription::RetrieveSubscription::new(id.as_str()).build()
                }
                Refetch::Object(id) => {
                    let (path, expand) = if id.starts_with("in_") {
                        (format!("/invoices/{id}"), "payments")
                    } else if id.starts_with("ch_") || id.starts_with("py_") {
                        (format!("/charges/{id}"), "refunds")
                    } else {
                        return None;
                    };
                    RequestBuilder::new(StripeMethod::Get, path).query(&Expand { expand: [expand] })
                }
                Refetch::InvoiceLines {
                    invoice,
                    starting_after,
                } => {
                    if !is_id(invoice) || !starting_after.as_deref().is_none_or(is_id) {
                        return None;
                    }
                    RequestBuilder::new(StripeMethod::Get, format!("/invoices/{invoice}/lines"))
                        .query(&LinesPage {
                            limit: 100,
                            starting_after: starting_after.as_deref(),
                        })
                }
            };
            let capture = Capture {
                inner: &client,
                last: Mutex::new(None),
            };
            match request
                .customize::<miniserde::json::Value>()
                .send(&capture)
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "refetching an object from Stripe failed");
                    return None;
                }
            }
            let bytes = capture.last.lock().expect("not poisoned").take()?;
            serde_json::from_slice(&bytes).ok()
        })
    })
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    data: Vec<&'a RawValue>,
    has_more: bool,
}

/// An item of a list, for its id alone.
#[derive(Deserialize)]
struct Listed {
    id: String,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub listed: usize,
    pub already_mirrored: usize,
    pub ingested: usize,
    /// Missing events by type (ingested, or that would be with --dry-run).
    pub missing_by_type: BTreeMap<String, usize>,
    pub unreadable: usize,
    /// Events of the other mode (test against live): the API key is not of
    /// this deployment's mode (`SLATE_LIVEMODE`). Skipped, as the webhook
    /// refuses them.
    pub other_mode: usize,
    /// Listed events of a connected account (Stripe Connect): skipped, as
    /// the webhook refuses them.
    pub other_account: usize,
    pub beyond_retention: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Stripe is not configured (STRIPE_API_KEY)")]
    NotConfigured,
    #[error("the Stripe Events API failed: {0}")]
    Stripe(String),
    #[error("the Events API answered with something that is not a list of events")]
    BadPage,
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

pub async fn reconcile(
    pool: &PgPool,
    client: Option<&stripe::Client>,
    livemode: bool,
    since: DateTime<Utc>,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<Summary, ReconcileError> {
    let client = client.ok_or(ReconcileError::NotConfigured)?;
    let mut summary = Summary {
        beyond_retention: since < now - Duration::days(RETENTION_DAYS),
        ..Default::default()
    };
    let capture = Capture {
        inner: client,
        last: Mutex::new(None),
    };
    let mut starting_after: Option<String> = None;
    loop {
        let mut list = ListEvent::new()
            .created(stripe_types::RangeQueryTs::gte(since.timestamp()))
            .limit(100);
        if let Some(after) = &starting_after {
            list = list.starting_after(after.clone());
        }
        list.build()
            .customize::<miniserde::json::Value>()
            .send(&capture)
            .await
            .map_err(|e| ReconcileError::Stripe(e.to_string()))?;
        let bytes = capture
            .last
            .lock()
            .expect("not poisoned")
            .take()
            .ok_or(ReconcileError::BadPage)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| ReconcileError::BadPage)?;
        let page: Page<'_> = serde_json::from_str(text).map_err(|_| ReconcileError::BadPage)?;
        let page_after = starting_after.clone();
        for raw in &page.data {
            summary.listed += 1;
            let raw = raw.get();
            let Some(event) = IncomingEvent::from_raw(raw, super::webhook::typed_parse_error(raw))
            else {
                // The list goes on from the last item, readable or not.
                if let Ok(Listed { id }) = serde_json::from_str::<Listed>(raw) {
                    starting_after = Some(id);
                }
                summary.unreadable += 1;
                continue;
            };
            starting_after = Some(event.stripe_event_id.clone());
            if event.livemode != livemode {
                summary.other_mode += 1;
                continue;
            }
            // As the webhook refuses them.
            if event.connected_account {
                summary.other_account += 1;
                continue;
            }
            let known = slate_events::stripe::is_mirrored(pool, &event.stripe_event_id)
                .await
                .map_err(|e| ReconcileError::Store(e.into()))?;
            if known {
                summary.already_mirrored += 1;
                continue;
            }
            *summary
                .missing_by_type
                .entry(event.event_type.clone())
                .or_default() += 1;
            if !dry_run
                && slate_workers::stripe::ingest(pool, &event, StripeSource::Reconcile).await?
            {
                summary.ingested += 1;
            }
        }
        if !page.has_more || page.data.is_empty() {
            break;
        }
        // A page whose items name no id cannot say where the list goes on;
        // asking from the same place again would get it again, for ever.
        if starting_after == page_after {
            return Err(ReconcileError::BadPage);
        }
    }
    Ok(summary)
}
