//! Stripe events: ingest (mirror + log + job, one transaction) and the
//! processing job.

use apalis::prelude::{AbortError, Attempt, BoxDynError, Data, TaskId};
use serde::{Deserialize, Serialize};
use slate_events::catalog::StripeSource;
use slate_events::stripe::{self, IncomingEvent, Outcome, ProcessError, StripeCatalog};
use sqlx::PgPool;

use crate::jobs;

pub const QUEUE: &str = "slate.stripe";
const MAX_ATTEMPTS: usize = 8;

/// The job carries the event id only; the payload stays in the mirror.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StripeJob {
    pub stripe_event_id: String,
}

/// Mirror a verified event, append `StripeEventReceived` and enqueue its
/// processing — all committed together, before the webhook answers 2xx.
/// Returns false for a duplicate delivery (only its delivery count changes).
#[tracing::instrument(skip_all, fields(stripe_event_id = %event.stripe_event_id, event_type = %event.event_type))]
pub async fn ingest(
    pool: &PgPool,
    event: &IncomingEvent,
    source: StripeSource,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let first = stripe::mirror(&mut tx, event, source).await?;
    if first {
        let job = StripeJob {
            stripe_event_id: event.stripe_event_id.clone(),
        };
        jobs::enqueue(&mut tx, QUEUE, &job, MAX_ATTEMPTS).await?;
    }
    tx.commit().await?;
    Ok(first)
}

/// What the processing job needs.
#[derive(Clone)]
pub struct StripeWorker {
    pub pool: PgPool,
    pub catalog: StripeCatalog,
    pub options: stripe::ProcessOptions,
}

#[tracing::instrument(skip_all, fields(job_id = %task_id, stripe_event_id = %job.stripe_event_id, attempt = attempt.current()))]
pub async fn handle(
    job: StripeJob,
    task_id: TaskId,
    attempt: Attempt,
    worker: Data<StripeWorker>,
) -> Result<(), BoxDynError> {
    jobs::contain(async move {
        match stripe::process_with(&worker.pool, &worker.catalog, &job.stripe_event_id, &worker.options).await {
            Ok(outcome) => {
                tracing::info!(outcome = outcome.describe(), "stripe event processed");
                Ok(())
            }
            Err(ProcessError::Retryable(reason)) => {
                let delay = jobs::backoff(attempt.current());
                tracing::warn!(%reason, retry_in_s = delay.as_secs(), "stripe event will be retried");
                jobs::retry_later(&worker.pool, &task_id.to_string(), delay).await?;
                Err(reason.into())
            }
            Err(ProcessError::Permanent(reason)) => {
                tracing::error!(%reason, "stripe event failed; replay it once fixed");
                Err(Box::new(AbortError::new(reason)) as BoxDynError)
            }
        }
    })
    .await
}

/// Process every mirrored event still pending, in Stripe's order. Tests use
/// it to run queued work in place; operators get it as `slate stripe replay
/// --pending`.
pub async fn process_pending(
    pool: &PgPool,
    catalog: &StripeCatalog,
) -> anyhow::Result<Vec<(String, Result<Outcome, String>)>> {
    let ids = stripe::select_for_replay(
        pool,
        &stripe::ReplayFilter {
            pending_only: true,
            ..Default::default()
        },
    )
    .await?;
    let mut out = Vec::new();
    for id in ids {
        let r = stripe::process(pool, catalog, &id, false)
            .await
            .map_err(|e| e.to_string());
        out.push((id, r));
    }
    Ok(out)
}
