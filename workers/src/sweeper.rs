//! The credit sweeper: lapses expired buckets and releases holds that nothing
//! resolved in time, so credits are never stranded. Safe to run in every
//! worker process at once (the stored functions serialize sweepers).

use chrono::{DateTime, Utc};
use slate_events::credits;
use sqlx::PgPool;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub holds_released: i32,
    pub buckets_expired: i32,
    pub generations_past_deadline: usize,
    pub generations_abandoned: usize,
    pub audit_entries_dropped: u64,
    pub purges_scheduled: usize,
    pub renewals_scheduled: usize,
    pub jobs_deleted: u64,
    pub workers_forgotten: u64,
    pub job_durations_folded: u64,
    pub stripe_events_folded: u64,
    pub generations_folded: u64,
    pub idempotency_keys_expired: u64,
    pub stripe_events_mapped: u64,
}

/// How often the job retention runs: it deletes what was finished days ago,
/// and finding the dead jobs scans the queue's table, so not at every sweep.
const JOB_RETENTION_EVERY: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// How often the job-duration fold runs (the Done jobs a scrape reads are
/// those finished since the last fold, less its margin).
const JOB_DURATION_FOLD_EVERY: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// How often the Stripe processing-lag fold runs (the events a scrape reads
/// are those processed since the last fold, less its margin).
const STRIPE_LAG_FOLD_EVERY: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// How often the generation-count fold runs (the finished generations a
/// scrape reads are those finished since the last fold, less its margin).
const GENERATION_COUNT_FOLD_EVERY: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// How often expired idempotency keys are deleted, and how many at most
/// each time (a day's submissions at well over 100 a second).
const IDEMPOTENCY_EXPIRY_EVERY: chrono::TimeDelta = chrono::TimeDelta::hours(1);
const IDEMPOTENCY_EXPIRY_BATCH: i64 = 500_000;

/// Mirrored Stripe events whose ids are written for the purge's look-up
/// (`stripe_events.refs`), in batches (a read, then one update), at each
/// sweep until this long has passed (the batch under way finishes): at the
/// batches' pace alone (about 18,000 rows a second: `slate bench --only
/// purge`) that is some 90,000 rows a sweep, so the rows written before the
/// column existed are done in about six minutes a million at the default
/// sweep interval. Until then a purge scans their bodies.
const STRIPE_REFS_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);
const STRIPE_REFS_BATCH: i64 = 1_000;

/// How often subscriptions left renewing for deleted accounts (or left
/// ending for restored ones) are looked for (`renewal::schedule_missing`).
const RENEWAL_CHECK_EVERY: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Claim `task` if it last ran `every` or longer before `now` (or never):
/// of the sweeps of all worker processes, one runs it.
async fn claim(
    pool: &PgPool,
    task: &str,
    now: DateTime<Utc>,
    every: chrono::TimeDelta,
) -> Result<bool, sqlx::Error> {
    let claimed: Option<i32> = sqlx::query_scalar(
        "insert into maintenance_runs (task, last_run) values ($1, $2)
         on conflict (task) do update set last_run = excluded.last_run
          where maintenance_runs.last_run <= excluded.last_run - $3
         returning 1",
    )
    .bind(task)
    .bind(now)
    .bind(every)
    .fetch_optional(pool)
    .await?;
    Ok(claimed.is_some())
}

/// One sweep at `now` (injected by tests), with the default job retention.
pub async fn sweep(pool: &PgPool, now: DateTime<Utc>) -> anyhow::Result<SweepReport> {
    sweep_with(pool, now, crate::jobs::Retention::default()).await
}

/// One sweep at `now`, keeping finished jobs as long as `retention` says.
pub async fn sweep_with(
    pool: &PgPool,
    now: DateTime<Utc>,
    retention: crate::jobs::Retention,
) -> anyhow::Result<SweepReport> {
    let generations_past_deadline = crate::generations::cancel_overdue(pool, now).await?;
    let generations_abandoned = crate::generations::fail_abandoned(pool, now).await?;
    let mut tx = pool.begin().await?;
    let holds_released = credits::release_stale_holds(&mut tx, now).await?;
    tx.commit().await?;
    let mut tx = pool.begin().await?;
    let buckets_expired = credits::expire(&mut tx, now).await?;
    tx.commit().await?;
    let mut conn = pool.acquire().await?;
    let audit_entries_dropped =
        slate_events::projections::audit::apply_retention(&mut conn, now).await?;
    drop(conn);
    let purges_scheduled = crate::purge::schedule_due(pool, now).await?;
    let renewals_scheduled = if claim(pool, "renewal_check", now, RENEWAL_CHECK_EVERY).await? {
        crate::renewal::schedule_missing(pool, now).await?
    } else {
        0
    };
    // Before the retention, which deletes only Done jobs already folded.
    let job_durations_folded =
        if claim(pool, "job_duration_fold", now, JOB_DURATION_FOLD_EVERY).await? {
            crate::jobs::fold_durations(pool, now).await?
        } else {
            0
        };
    let (jobs_deleted, workers_forgotten) =
        if claim(pool, "job_retention", now, JOB_RETENTION_EVERY).await? {
            let jobs = crate::jobs::apply_retention(pool, now, retention).await?;
            // After the jobs, which may have been the last to name a worker.
            (jobs, crate::jobs::forget_dead_workers(pool, now).await?)
        } else {
            (0, 0)
        };
    let stripe_events_folded = if claim(pool, "stripe_lag_fold", now, STRIPE_LAG_FOLD_EVERY).await?
    {
        crate::stripe::fold_processing_lag(pool, now).await?
    } else {
        0
    };
    let generations_folded = if claim(
        pool,
        "generation_count_fold",
        now,
        GENERATION_COUNT_FOLD_EVERY,
    )
    .await?
    {
        crate::generations::fold_counts(pool, now).await?
    } else {
        0
    };
    let idempotency_keys_expired =
        if claim(pool, "idempotency_expiry", now, IDEMPOTENCY_EXPIRY_EVERY).await? {
            let mut conn = pool.acquire().await?;
            slate_events::generations::expire_idempotency_keys(
                &mut conn,
                now,
                IDEMPOTENCY_EXPIRY_BATCH,
            )
            .await?
        } else {
            0
        };
    let stripe_events_mapped = map_stripe_events(pool, STRIPE_REFS_BUDGET).await?;
    Ok(SweepReport {
        stripe_events_mapped,
        idempotency_keys_expired,
        jobs_deleted,
        workers_forgotten,
        job_durations_folded,
        stripe_events_folded,
        generations_folded,
        purges_scheduled,
        renewals_scheduled,
        holds_released,
        buckets_expired,
        generations_past_deadline,
        generations_abandoned,
        audit_entries_dropped,
    })
}

/// Write the ids of mirrored Stripe events not mapped yet, oldest first, a
/// batch at a time until none is left or `budget` has passed (one batch at
/// least); how many were mapped.
pub async fn map_stripe_events(
    pool: &PgPool,
    budget: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut mapped = 0;
    loop {
        let n = slate_events::stripe::map_unmapped(pool, STRIPE_REFS_BATCH).await?;
        mapped += n;
        if n < STRIPE_REFS_BATCH as u64 || started.elapsed() >= budget {
            return Ok(mapped);
        }
    }
}

/// The scheduled maintenance job (`slate.maintenance`): holds past their
/// expiry, expired buckets, overdue generations, audit retention, purges due,
/// and (less often) the job-duration fold, job retention (and the rows of
/// workers long dead), the generation-count fold, the Stripe
/// processing-lag fold and expired idempotency keys; and the ids of
/// mirrored Stripe events not yet written for the purge's look-up.
pub const QUEUE: &str = "slate.maintenance";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SweepJob {
    /// The schedule slot it was enqueued for (one job per slot).
    pub slot: i64,
}

/// Enqueue this slot's sweep unless one is already queued or running: every
/// worker process ticks, one job runs.
pub async fn schedule(pool: &PgPool, slot: i64) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock(hashtext('slate.maintenance.schedule'))")
        .execute(&mut *tx)
        .await?;
    let pending: bool = sqlx::query_scalar(
        "select exists(select 1 from apalis.jobs where job_type = $1 and status in ('Pending', 'Queued', 'Running'))",
    )
    .bind(QUEUE)
    .fetch_one(&mut *tx)
    .await?;
    if pending {
        return Ok(false);
    }
    let wake = crate::jobs::enqueue(&mut tx, QUEUE, &SweepJob { slot }, 3).await?;
    tx.commit().await?;
    wake.send(pool).await;
    Ok(true)
}

/// What the maintenance job works with.
#[derive(Clone)]
pub struct Maintenance {
    pub pool: PgPool,
    pub retention: crate::jobs::Retention,
}

#[tracing::instrument(level = "error", skip_all, fields(job_id = %task_id, slot = job.slot))]
pub async fn handle(
    job: SweepJob,
    task_id: apalis::prelude::TaskId,
    m: apalis::prelude::Data<Maintenance>,
) -> Result<(), apalis::prelude::BoxDynError> {
    let _ = job;
    crate::jobs::contain(async move {
        let r = sweep_with(&m.pool, chrono::Utc::now(), m.retention)
            .await
            .map_err(|e| -> apalis::prelude::BoxDynError {
                // apalis records the error on the job but logs nothing.
                tracing::warn!(error = %e, "maintenance sweep failed; the next slot runs it again");
                e.into()
            })?;
        if r != SweepReport::default() {
            tracing::info!(
                holds_released = r.holds_released,
                buckets_expired = r.buckets_expired,
                generations_past_deadline = r.generations_past_deadline,
                generations_abandoned = r.generations_abandoned,
                audit_entries_dropped = r.audit_entries_dropped,
                purges_scheduled = r.purges_scheduled,
                renewals_scheduled = r.renewals_scheduled,
                jobs_deleted = r.jobs_deleted,
                workers_forgotten = r.workers_forgotten,
                job_durations_folded = r.job_durations_folded,
                stripe_events_folded = r.stripe_events_folded,
                generations_folded = r.generations_folded,
                idempotency_keys_expired = r.idempotency_keys_expired,
                stripe_events_mapped = r.stripe_events_mapped,
                "maintenance sweep"
            );
        }
        Ok(())
    })
    .await
}
