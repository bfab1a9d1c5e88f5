//! Stripe events: ingest (mirror + log + job, one transaction) and the
//! processing job.

use apalis::prelude::{AbortError, Attempt, BoxDynError, Data, TaskId};
use serde::{Deserialize, Serialize};
use slate_events::catalog::StripeSource;
use slate_events::stripe::{self, IncomingEvent, Outcome, ProcessError, StripeCatalog};
use sqlx::PgPool;

use crate::jobs;

pub const QUEUE: &str = "slate.stripe";
/// How many times an event's processing is tried when it fails for a
/// reason that may pass (Stripe's API or PostgreSQL out of reach, a
/// customer not linked to an account yet): with
/// [`retry_delay`], for about a day (21 h and up to a quarter more), as
/// Stripe itself goes on delivering for days. An invoice's processing reads
/// Stripe's API; with 8 tries over about 8 minutes, an outage of Stripe's
/// API, or of the way to it, longer than that left every invoice paid
/// meanwhile ungranted until an operator replayed it (Stripe, answered
/// 200, does not deliver again).
const MAX_ATTEMPTS: usize = 32;

/// The wait after attempt `n`: doubling from 2 s to an hour.
fn retry_delay(attempt: usize) -> std::time::Duration {
    jobs::backoff_up_to(attempt, 3600)
}

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
    Ok(ingest_many(pool, &[(event, source)]).await?[0])
}

/// Mirror, log and enqueue several deliveries with one statement that
/// commits on its own ([`stripe::ingest_many`]), then wake the processing
/// workers.
async fn ingest_many(
    pool: &PgPool,
    deliveries: &[(&IncomingEvent, StripeSource)],
) -> Result<Vec<bool>, slate_events::Error> {
    let new_id = || ulid::Ulid::generate().to_string();
    let payload = |e: &IncomingEvent| {
        serde_json::to_vec(&StripeJob {
            stripe_event_id: e.stripe_event_id.clone(),
        })
        .expect("job payloads serialize")
    };
    let processing = stripe::ProcessingJobs {
        queue: QUEUE,
        max_attempts: MAX_ATTEMPTS as i32,
        new_id: &new_id,
        payload: &payload,
    };
    let first = stripe::ingest_many(pool, deliveries, &processing).await?;
    // Committed (the statement commits on its own): a job was enqueued for
    // each first delivery. The deliveries are answered without waiting for
    // the wake-up (nor is the batch writer held up by it).
    if first.contains(&true) {
        let pool = pool.clone();
        tokio::spawn(async move { jobs::Wake::queue(QUEUE).send(&pool).await });
    }
    Ok(first)
}

/// Webhook deliveries that arrive together, ingested in one transaction
/// (group commit, [`slate_events::batch`]): each is answered after that
/// commit, with whether it was the first delivery of its event.
pub type IngestBatcher = slate_events::batch::Batcher<IngestWriter>;

pub fn ingest_batcher(pool: PgPool) -> IngestBatcher {
    slate_events::batch::Batcher::start(
        IngestWriter { pool },
        slate_events::batch::BatchOptions::default(),
    )
}

pub struct IngestWriter {
    pool: PgPool,
}

impl slate_events::batch::BatchWrite for IngestWriter {
    type Item = (IncomingEvent, StripeSource);
    type Output = bool;
    type Error = anyhow::Error;

    async fn write(&self, items: Vec<Self::Item>) -> Vec<anyhow::Result<bool>> {
        let deliveries: Vec<(&IncomingEvent, StripeSource)> =
            items.iter().map(|(e, s)| (e, *s)).collect();
        let together = ingest_many(&self.pool, &deliveries).await;
        match together {
            Ok(first) => first.into_iter().map(Ok).collect(),
            // PostgreSQL is out of reach: every delivery is refused now (the
            // webhook answers 503 and Stripe retries), none waits twice.
            Err(e) if slate_events::db::unavailable_in(&e) => {
                let timed_out = slate_events::db::timed_out_in(&e);
                items.iter().map(|_| Err(unavailable(timed_out))).collect()
            }
            // One at a time, so that each delivery gets its own answer (a
            // delivery that did commit is then a duplicate: the count is off
            // by one, never the ingest).
            Err(_) if items.len() > 1 => {
                futures::future::join_all(items.iter().map(|(e, s)| ingest(&self.pool, e, *s)))
                    .await
            }
            Err(e) => vec![Err(e.into())],
        }
    }

    /// After the pool gave up on a connection, deliveries that waited
    /// meanwhile are refused at once (503; Stripe delivers them again).
    fn refusal(&self, outcome: &anyhow::Result<bool>) -> Option<anyhow::Error> {
        match outcome {
            Err(e) if slate_events::db::timed_out_in(e.as_ref()) => Some(unavailable(true)),
            _ => None,
        }
    }
}

/// The answer for each delivery of a batch that found PostgreSQL out of
/// reach: the pool timed out waiting for a connection, or the connection
/// failed (errors are not `Clone`; each delivery gets its own).
fn unavailable(timed_out: bool) -> anyhow::Error {
    let cause = if timed_out {
        sqlx::Error::PoolTimedOut
    } else {
        sqlx::Error::Io(std::io::ErrorKind::ConnectionAborted.into())
    };
    anyhow::Error::new(cause).context("database unavailable")
}

/// What the processing job needs.
#[derive(Clone)]
pub struct StripeWorker {
    pub pool: PgPool,
    pub catalog: StripeCatalog,
    pub options: stripe::ProcessOptions,
}

#[tracing::instrument(level = "error", skip_all, fields(job_id = %task_id, stripe_event_id = %job.stripe_event_id, attempt = attempt.current()))]
pub async fn handle(
    job: StripeJob,
    task_id: TaskId,
    attempt: Attempt,
    worker: Data<StripeWorker>,
) -> Result<(), BoxDynError> {
    let (pool, id) = (worker.pool.clone(), job.stripe_event_id.clone());
    let result = jobs::contain(async move {
        match stripe::process_with(&worker.pool, &worker.catalog, &job.stripe_event_id, &worker.options).await {
            Ok(outcome) => {
                tracing::info!(outcome = outcome.describe(), "stripe event processed");
                Ok(())
            }
            Err(ProcessError::Retryable(reason)) => {
                let delay = retry_delay(attempt.current());
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
    .await;
    // A panic ended the job before processing could record anything: the
    // event would stay `pending` with no job to run it, out of sight of
    // `replay --failed`.
    if let Err(e) = &result
        && jobs::panicked(e)
        && let Err(e) = stripe::mark_failed(&pool, &id, "processing panicked").await
    {
        tracing::error!(error = %e, "could not record a panicked processing");
    }
    result
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

/// Fold the Stripe events processed before `now` less
/// [`jobs::FOLD_MARGIN`] (and before the database's own clock less it) into
/// `stripe_lag_retired`, and move the watermark there; returns how many were
/// folded. `/metrics` then reads only the events processed since, so a
/// scrape stays cheap however large the mirror grows. Each processing is
/// counted once: an event replayed later is stamped again, after the
/// watermark, and counts again; one replayed before its earlier processing
/// was folded adds that one to the totals itself (`slate_events::stripe`,
/// under this watermark's lock).
pub async fn fold_processing_lag(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    Ok(fold_processing_lag_by(pool, now, jobs::FOLD_STEP).await?.0)
}

/// [`fold_processing_lag`] at most `step` events a transaction; returns
/// the events folded and the transactions it took.
pub async fn fold_processing_lag_by(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
    step: i64,
) -> Result<(u64, u32), sqlx::Error> {
    let fold = format!(
        "with a as ({}),
              totals as (
                 insert into stripe_lag_retired (le, events, seconds)
                 select b.le, a.counts[b.i], a.sums[b.i]
                   from a cross join unnest($3::float8[]) with ordinality b(le, i)
                 on conflict (le) do update
                    set events = stripe_lag_retired.events + excluded.events,
                        seconds = stripe_lag_retired.seconds + excluded.seconds)
         select counts[cardinality(counts)] from a",
        jobs::bucket_aggregates_query(
            None,
            "select extract(epoch from processed_at - received_at)::float8 d
               from stripe_events where processed_at >= $1 and processed_at < $2"
        )
    );
    let f = jobs::Fold {
        first: None,
        watermark: "stripe_lag_watermark",
        table: "stripe_events",
        filter: "true",
        stamp: "processed_at",
        fold: &fold,
    };
    jobs::fold_before_watermark(pool, now, &f, step).await
}

#[cfg(test)]
mod tests {
    use super::{MAX_ATTEMPTS, retry_delay};

    /// The retries of an event's processing outlast about a day of Stripe
    /// out of reach, and none waits more than an hour and a quarter.
    #[test]
    fn processing_is_retried_for_about_a_day_at_most_an_hour_and_a_quarter_apart() {
        let waits: Vec<u64> = (1..MAX_ATTEMPTS)
            .map(|n| retry_delay(n).as_secs())
            .collect();
        assert!(waits.iter().all(|&w| (2..=4500).contains(&w)), "{waits:?}");
        assert!(waits.windows(2).all(|w| w[1] * 5 >= w[0] * 4), "{waits:?}");
        let total: u64 = waits.iter().sum();
        assert!((20 * 3600..=27 * 3600).contains(&total), "{total} s");
    }
}
