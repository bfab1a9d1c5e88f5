//! Enqueueing jobs inside the caller's transaction: a job exists exactly when
//! the write it follows committed. The queue's workers hear of it after that
//! commit ([`Wake`]), never from inside it.

use apalis::prelude::{TaskBuilder, TaskId};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// How many times the database may hand a job out before it stays failed.
/// apalis-postgres re-runs a failed job as soon as its `run_at` has passed;
/// handlers push `run_at` forward themselves for backoff (see [`backoff`]).
pub const DEFAULT_MAX_ATTEMPTS: usize = 5;

/// The notification channel the workers listen on (apalis-postgres's:
/// its payload is `{"job_type": queue, "id": job}`; see [`crate::poll::Wakeups`]).
pub(crate) const CHANNEL: &str = "apalis::job::insert";

/// The SQL predicate of a job waiting to be fetched: new, or failed with
/// attempts to go (the fetch's, and its partial index's). A macro, so that
/// a query can `concat!` it into its static text.
#[macro_export]
macro_rules! job_waiting {
    () => {
        "(status = 'Pending' or (status = 'Failed' and attempts < max_attempts))"
    };
}

/// The SQL predicate of a live job: waiting ([`job_waiting!`]) or taken by
/// a worker. A job that is not live is done, or stopped for good (killed,
/// or failed with no attempts left).
#[macro_export]
macro_rules! job_live {
    () => {
        "(status in ('Pending', 'Queued', 'Running') or (status = 'Failed' and attempts < max_attempts))"
    };
}

/// Jobs pushed in a transaction that has not committed yet: after the
/// commit, [`send`](Wake::send) tells their queues' workers.
///
/// apalis-postgres notifies from a trigger on `apalis.jobs`, inside the
/// enqueuing transaction. A notifying transaction takes a database-wide lock
/// at its commit and holds it until the commit is on disk, so every
/// enqueuing transaction waited in line for the WAL flushes of all the others
/// (about 400 commits/s here, however many clients: each submission of a
/// generation is one). Migration `…20261204000101` drops that trigger; the
/// notification is sent after the commit, by a statement that writes nothing
/// and so waits for no flush. A wake that is never sent (or fails) loses
/// nothing: the workers poll every second anyway (`poll::SAFETY_NET`).
#[must_use = "send it after the commit (Wake::send), or the workers find the job only on their next poll, up to a second later"]
#[derive(Debug, Default)]
pub struct Wake {
    /// The queue, and the id of one job pushed onto it ("" when it is not
    /// known); `None` when nothing was enqueued.
    job: Option<(String, String)>,
}

impl Wake {
    /// Nothing was enqueued.
    pub fn none() -> Self {
        Self::default()
    }

    /// The job `id` was pushed onto `queue`.
    pub fn job(queue: &str, id: impl ToString) -> Self {
        Self {
            job: Some((queue.to_owned(), id.to_string())),
        }
    }

    /// Jobs were pushed onto `queue`.
    pub fn queue(queue: &str) -> Self {
        Self::job(queue, "")
    }

    /// Tell the queue's workers, after the commit that made the jobs
    /// visible: one notification (apalis-postgres's payload), one round
    /// trip, nothing to flush. A failure is logged and otherwise ignored
    /// (see [`Wake`]).
    pub async fn send(self, pool: &PgPool) {
        let Some((queue, id)) = self.job else {
            return;
        };
        let sent = sqlx::query(
            "select pg_notify($1, json_build_object('job_type', $2::text, 'id', $3::text)::text)",
        )
        .bind(CHANNEL)
        .bind(&queue)
        .bind(&id)
        .execute(pool)
        .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "waking the workers failed; they find the jobs on their next poll");
        }
    }
}

/// A job's own limit of attempts, as its row has it (`max_attempts`, set
/// when it was enqueued): a handler extracts it to know its last attempt,
/// the one apalis will not retry. The limit a process is configured with
/// may differ (another process enqueued the job, with its own setting, or
/// before a change of it); a handler that judged by its own would ask for a
/// retry that never comes, or give up with attempts left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAttempts(pub Option<usize>);

impl<Args: Sync> apalis_core::task::from_request::FromRequest<apalis_core::task::Task<Args>>
    for MaxAttempts
{
    type Error = std::convert::Infallible;
    async fn from_request(task: &apalis_core::task::Task<Args>) -> Result<Self, Self::Error> {
        Ok(MaxAttempts(task.max_attempts()))
    }
}

/// `job`'s task, with an id of its own (a ULID, as apalis-postgres makes
/// them) for its wake-up to name.
fn task<J: Serialize>(job: &J, max_attempts: usize) -> (TaskBuilder<Vec<u8>>, TaskId) {
    let bytes = serde_json::to_vec(job).expect("job payloads serialize");
    let id = TaskId::from_string(ulid::Ulid::generate().to_string());
    let task = TaskBuilder::new(bytes)
        .task_id(id.clone())
        .max_attempts(max_attempts);
    (task, id)
}

/// Push `job` onto `queue` on the caller's connection (use the transaction of
/// the write the job follows); [`Wake::send`] once it has committed.
/// Payloads carry ids, never prompts or personal data.
pub async fn enqueue<J: Serialize>(
    conn: &mut PgConnection,
    queue: &str,
    job: &J,
    max_attempts: usize,
) -> Result<Wake, apalis_postgres::Error> {
    let (task, id) = task(job, max_attempts);
    apalis_postgres::queries::push_tasks(conn, queue, vec![task.build()]).await?;
    Ok(Wake::job(queue, id))
}

/// [`enqueue`] under `key` (unique in its queue: a second push under it
/// fails).
pub async fn enqueue_keyed<J: Serialize>(
    conn: &mut PgConnection,
    queue: &str,
    job: &J,
    max_attempts: usize,
    key: &str,
) -> Result<Wake, apalis_postgres::Error> {
    let (task, id) = task(job, max_attempts);
    let task = task.idempotency_key(key).build();
    apalis_postgres::queries::push_tasks(conn, queue, vec![task]).await?;
    Ok(Wake::job(queue, id))
}

/// Enqueue `job` unless one under the same `key` is waiting or running (a
/// finished or dead one makes room). Returns whether it enqueued.
pub async fn enqueue_once<J: Serialize>(
    pool: &sqlx::PgPool,
    queue: &str,
    job: &J,
    max_attempts: usize,
    key: &str,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("{queue}/{key}"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(concat!(
        "delete from apalis.jobs where job_type = $1 and idempotency_key = $2 and not ",
        crate::job_live!(),
    ))
    .bind(queue)
    .bind(key)
    .execute(&mut *tx)
    .await?;
    let exists: bool = sqlx::query_scalar(
        "select exists(select 1 from apalis.jobs where job_type = $1 and idempotency_key = $2)",
    )
    .bind(queue)
    .bind(key)
    .fetch_one(&mut *tx)
    .await?;
    if exists {
        return Ok(false);
    }
    let wake = enqueue_keyed(&mut tx, queue, job, max_attempts, key).await?;
    tx.commit().await?;
    wake.send(pool).await;
    Ok(true)
}

/// Exponential backoff with a ceiling of ten minutes and up to 25 % jitter
/// (so retries of many jobs that failed together spread out), for attempt
/// `n` (1-based).
pub fn backoff(attempt: usize) -> std::time::Duration {
    backoff_up_to(attempt, 600)
}

/// [`backoff`] with a ceiling of `ceiling_s` seconds.
pub fn backoff_up_to(attempt: usize, ceiling_s: u64) -> std::time::Duration {
    let base_ms = 1000 * 2u64.saturating_pow(attempt.min(20) as u32).min(ceiling_s);
    let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as u64 * base_ms / 4000;
    std::time::Duration::from_millis(base_ms + jitter)
}

/// The job queue's own migrations (schema `apalis`, recorded in
/// `_sqlx_migrations`).
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), apalis_postgres::Error> {
    apalis_postgres::PostgresStorage::setup(pool).await
}

/// A job's handler panicked. The job is killed (never retried: a panic is a
/// bug, and running it again would panic again).
#[derive(Debug, thiserror::Error)]
#[error("job panicked: {0}")]
pub struct JobPanicked(pub String);

/// Run a handler body so that a panic inside it becomes a terminal job error
/// the queue records (status `Killed`), instead of unwinding through apalis,
/// which would leave the job marked `Running` for ever.
pub async fn contain<F, T>(body: F) -> Result<T, apalis::prelude::BoxDynError>
where
    F: std::future::Future<Output = Result<T, apalis::prelude::BoxDynError>>,
{
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(body).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            tracing::error!(panic = %message, "job panicked; killed");
            Err(Box::new(apalis::prelude::AbortError::new(JobPanicked(
                message,
            ))))
        }
    }
}

/// True when `error` is what [`contain`] made of a panic.
pub fn panicked(error: &apalis::prelude::BoxDynError) -> bool {
    use std::error::Error as _;
    error
        .downcast_ref::<apalis::prelude::AbortError>()
        .and_then(|e| e.source())
        .is_some_and(|e| e.is::<JobPanicked>())
}

/// The job-duration histogram's bounds; the fold ([`fold_durations`]) adds
/// finished jobs to the same buckets.
pub use slate_events::histogram::{DURATION_BUCKETS, duration_bounds};

/// A query over `rows` (SQL selecting a column `d` of seconds, and `key` if
/// given) returning, per `key`, two arrays aligned with [`duration_bounds`]
/// aggregated in one pass: `counts`, how many rows have `d` at most each
/// bound, and `sums`, the sum of those `d`. Joining the rows with the bounds
/// instead read every row once per bound (8.4 s against 1.3 s over 1 M
/// Stripe events). `d` is named 33 times, so `rows` is fenced with `offset
/// 0`: inlined, PostgreSQL computed its expression (a numeric `extract`) at
/// every mention (154 against 28 ms over 16,500 jobs in psql).
pub fn bucket_aggregates_query(key: Option<&str>, rows: &str) -> String {
    let aggregates = bucket_aggregates_sql("d");
    match key {
        Some(k) => format!("select {k}, {aggregates} from ({rows} offset 0) r group by {k}"),
        None => format!("select {aggregates} from ({rows} offset 0) r"),
    }
}

fn bucket_aggregates_sql(seconds: &str) -> String {
    let mut counts = Vec::new();
    let mut sums = Vec::new();
    for le in DURATION_BUCKETS {
        counts.push(format!("count(*) filter (where {seconds} <= {le:?})"));
        sums.push(format!(
            "coalesce(sum({seconds}) filter (where {seconds} <= {le:?}), 0)"
        ));
    }
    counts.push(format!("count({seconds})"));
    sums.push(format!("coalesce(sum({seconds}), 0)"));
    format!(
        "array[{}]::int8[] as counts, array[{}]::float8[] as sums",
        counts.join(", "),
        sums.join(", ")
    )
}

/// How long finished jobs stay in `apalis.jobs`. Nothing reads a finished
/// job but `/metrics` and whoever investigates a queue: a generation's, a
/// Stripe event's and an email's outcome are recorded where they belong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Jobs that succeeded (`Done`).
    pub done: std::time::Duration,
    /// Jobs that will not run again: killed, or failed with no attempt left.
    pub dead: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            done: std::time::Duration::from_secs(7 * DAY),
            dead: std::time::Duration::from_secs(30 * DAY),
        }
    }
}

/// Rows one retention statement deletes (a short transaction each).
const RETENTION_BATCH: i64 = 5_000;

/// Delete the jobs that finished longer ago than `retention` allows, in
/// batches; returns how many. Pending, running and retrying jobs are never
/// touched, nor Done jobs not folded into `job_durations_retired` yet
/// ([`fold_durations`]), so `/metrics`' histogram stays cumulative.
pub async fn apply_retention(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
    retention: Retention,
) -> Result<u64, sqlx::Error> {
    let cutoff = |d| retention_cutoff(now, d);
    let mut deleted = 0;
    loop {
        let n = sqlx::query(
            "delete from apalis.jobs where id in (
                 select id from apalis.jobs
                  where (status = 'Done'
                         and done_at < least($1, (select upto from job_duration_watermark)))
                     or ((status = 'Killed' or (status = 'Failed' and attempts >= max_attempts))
                         and done_at < $2)
                  limit $3
                    for update skip locked)",
        )
        .bind(cutoff(retention.done))
        .bind(cutoff(retention.dead))
        .bind(RETENTION_BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        deleted += n;
        if n < RETENTION_BATCH as u64 {
            return Ok(deleted);
        }
    }
}

/// `now` less `retention`; a retention too long to subtract keeps
/// everything since 1970.
fn retention_cutoff(
    now: chrono::DateTime<chrono::Utc>,
    retention: std::time::Duration,
) -> chrono::DateTime<chrono::Utc> {
    chrono::Duration::from_std(retention)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(chrono::DateTime::UNIX_EPOCH)
}

/// How long the row of a worker that stopped heartbeating stays once no job
/// names it.
pub const DEAD_WORKER_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Delete the rows of workers that have not heartbeated for
/// [`DEAD_WORKER_RETENTION`] and that no job names (a job keeps the worker
/// that last took it in `lock_by`, which references the row, until the job
/// retention deletes it); returns how many. Nothing else deletes them, and
/// every `slate work` start adds one per queue, every restart of a failed
/// worker one more (`runtime::Instances::name`).
pub async fn forget_dead_workers(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    let cutoff = retention_cutoff(now, DEAD_WORKER_RETENTION);
    Ok(sqlx::query(
        "delete from apalis.workers w
          where w.last_seen < $1
            and not exists (select 1 from apalis.jobs j where j.lock_by = w.id)",
    )
    .bind(cutoff)
    .execute(pool)
    .await?
    .rows_affected())
}

/// How far behind the database's clock a fold stays ([`fold_durations`],
/// `stripe::fold_processing_lag`): a row is stamped by its last statement
/// before the commit (a completion's `done_at`, a processing's
/// `processed_at`), so one committing after the fold (a slow commit, a
/// fault injected before it) must still land after the watermark.
pub const FOLD_MARGIN: chrono::TimeDelta = chrono::TimeDelta::minutes(15);

/// At most how many rows one transaction of a fold adds ([`fold_before_watermark`]).
pub const FOLD_STEP: i64 = 100_000;

/// A watermark fold: its one-row table, the rows it folds and their stamp,
/// and the statement that adds a range's rows to the totals (which may
/// leave the bucket bounds `$3` unused).
pub(crate) struct Fold<'a> {
    /// Run first in each transaction, before the watermark is locked (a
    /// table lock to take in the order other writers of the totals take it).
    pub first: Option<&'a str>,
    /// A one-row table whose `upto` says where folded rows end.
    pub watermark: &'a str,
    /// The rows folded: a table and a condition (`true` for all of them).
    pub table: &'a str,
    pub filter: &'a str,
    /// Their stamp, indexed for the rows of `filter`.
    pub stamp: &'a str,
    /// Adds the rows stamped in `[$1, $2)` to its totals by the bucket
    /// bounds `$3` and returns how many it added (or null for none).
    pub fold: &'a str,
}

/// Move the fold's watermark to `now` less [`FOLD_MARGIN`] (and no later
/// than the database's own clock less it; never back), folding the rows
/// passed over on the way, at most `step` rows a transaction: each
/// transaction holds the watermark's row, folds a range and moves the
/// watermark to its end. A first fold over a table of millions of rows is
/// so many short transactions, not one long one that a replay waiting on
/// the watermark would wait for. Returns the rows folded and the
/// transactions it took.
pub(crate) async fn fold_before_watermark(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
    f: &Fold<'_>,
    step: i64,
) -> Result<(u64, u32), sqlx::Error> {
    type At = chrono::DateTime<chrono::Utc>;
    let (mut rows, mut steps) = (0u64, 0u32);
    loop {
        let mut tx = pool.begin().await?;
        if let Some(first) = f.first {
            sqlx::query(sqlx::AssertSqlSafe(first.to_owned()))
                .execute(&mut *tx)
                .await?;
        }
        let (from, target): (At, At) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select upto, greatest(upto, least($1, now()) - $2) from {} for update",
            f.watermark
        )))
        .bind(now)
        .bind(FOLD_MARGIN)
        .fetch_one(&mut *tx)
        .await?;
        // Planned for each range (`persistent(false)`): a plan cached while
        // every row was past the watermark (before the first fold) would go
        // on scanning the table after it.
        // Where a step of `step` rows ends: the stamp of the row after them.
        let end: Option<At> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select {stamp} from {} where {} and {stamp} >= $1 and {stamp} < $2
              order by {stamp} offset $3 limit 1",
            f.table,
            f.filter,
            stamp = f.stamp
        )))
        .bind(from)
        .bind(target)
        .bind(step)
        .persistent(false)
        .fetch_optional(&mut *tx)
        .await?;
        // The step ends before the row that ends it; when that row shares
        // `from`'s stamp, the step takes every row of that stamp instead
        // (more than `step` then), so that each step moves on.
        let to = end.map_or(target, |end| {
            end.max(from + chrono::TimeDelta::microseconds(1))
                .min(target)
        });
        let folded: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(f.fold.to_owned()))
            .bind(from)
            .bind(to)
            .bind(duration_bounds())
            .persistent(false)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "update {} set upto = $1",
            f.watermark
        )))
        .bind(to)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        rows += folded.unwrap_or(0) as u64;
        steps += 1;
        if to >= target {
            return Ok((rows, steps));
        }
    }
}

/// Fold the durations of the Done jobs finished before `now` less
/// [`FOLD_MARGIN`] (and before the database's own clock less it) into
/// `job_durations_retired`, and move the watermark there; returns how many
/// were folded. `/metrics` then reads only the jobs finished since, so a
/// scrape stays cheap however many finished jobs the retention keeps.
pub async fn fold_durations(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    Ok(fold_durations_by(pool, now, FOLD_STEP).await?.0)
}

/// [`fold_durations`] at most `step` jobs a transaction; returns the jobs
/// folded and the transactions it took.
pub async fn fold_durations_by(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
    step: i64,
) -> Result<(u64, u32), sqlx::Error> {
    let fold = format!(
        "with a as ({}),
              totals as (
                 insert into job_durations_retired (job_type, le, jobs, seconds)
                 select a.job_type, b.le, a.counts[b.i], a.sums[b.i]
                   from a cross join unnest($3::float8[]) with ordinality b(le, i)
                 on conflict (job_type, le) do update
                    set jobs = job_durations_retired.jobs + excluded.jobs,
                        seconds = job_durations_retired.seconds + excluded.seconds)
         select sum(counts[cardinality(counts)])::int8 from a",
        bucket_aggregates_query(
            Some("job_type"),
            "select job_type, extract(epoch from done_at - lock_at)::float8 d
               from apalis.jobs where status = 'Done' and done_at >= $1 and done_at < $2"
        )
    );
    let f = Fold {
        first: None,
        watermark: "job_duration_watermark",
        table: "apalis.jobs",
        filter: "status = 'Done'",
        stamp: "done_at",
        fold: &fold,
    };
    fold_before_watermark(pool, now, &f, step).await
}

/// Push a failing job's next run into the future: apalis-postgres re-runs a
/// failed job as soon as `run_at` has passed, so this is the backoff, and it
/// survives a crash.
pub async fn retry_later(
    pool: &sqlx::PgPool,
    task_id: &str,
    delay: std::time::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query("update apalis.jobs set run_at = now() + make_interval(secs => $2) where id = $1")
        .bind(task_id)
        .bind(delay.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod panic_tests {
    use apalis::prelude::BoxDynError;

    #[tokio::test]
    async fn a_contained_panic_is_told_from_other_errors() {
        let panicked = super::contain(async {
            if u8::MAX > 1 {
                panic!("boom");
            }
            Ok::<(), BoxDynError>(())
        })
        .await
        .unwrap_err();
        assert!(super::panicked(&panicked));
        let failed = super::contain(async { Err::<(), BoxDynError>("no".into()) })
            .await
            .unwrap_err();
        assert!(!super::panicked(&failed));
        let aborted = super::contain(async {
            Err::<(), BoxDynError>(Box::new(apalis::prelude::AbortError::new("no")))
        })
        .await
        .unwrap_err();
        assert!(!super::panicked(&aborted));
    }
}
