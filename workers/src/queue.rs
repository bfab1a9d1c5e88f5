//! The job queue's storage: apalis-postgres's tables and queries, driven
//! by apalis-core's [`Persisted`] state machine. Where it differs from
//! `apalis_postgres::PostgresStorage`: a worker with a concurrency limit
//! fetches only as many jobs as it has free slots (below), and the fetch and
//! the completion are statements of our own that keep their plans
//! (`fetch`, `complete`).
//!
//! apalis-core 1.0 sends no heartbeat and flushes no lock or completion
//! while fetched jobs wait in its buffer (`Persisted::poll_ready` does
//! nothing in the `Buffered` state). With a fixed batch of 10 and 8 slots
//! busy with long provider calls, a worker would fall silent for as long as
//! they run, and after 3 missed beats the others may take it for dead and
//! run its jobs again. `PostgresStorage` can only avoid that by fetching one
//! job at a time, which costs a fetch, a lock and a completion transaction
//! per job. Fetching `slots - running` jobs instead lets every fetched job
//! start at once (so the buffer is empty again before the state machine
//! next runs) and still takes a whole backlog's worth per fetch.

use std::marker::PhantomData;
use std::task::{Context, Poll};

use apalis::prelude::{Backend, WorkerContext};
use apalis_codec::json::JsonCodec;
use apalis_core::backend::finalize::Durable;
use apalis_core::backend::persistence::{
    Persisted, Persistence, State, TaskEvent, TaskPersistLayer,
};
use apalis_core::backend::{BackendConfig, WireFormatBackend};
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::metadata::MetadataStore;
use apalis_core::task::status::Status;
use apalis_core::task::task_id::{TaskId, TaskIdError};
use apalis_postgres::{Config, Error, PgTask, queries};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::postgres::types::PgHstore;
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;
use ulid::Ulid;

use crate::in_flight::InFlight;

/// One queue's jobs, as a worker takes them.
pub struct QueueStorage<Args> {
    persistence: Persisted<Bookkeeping>,
    codec: JsonCodec,
    _args: PhantomData<Args>,
}

impl<Args> Clone for QueueStorage<Args> {
    fn clone(&self) -> Self {
        Self {
            persistence: self.persistence.clone(),
            codec: self.codec.clone(),
            _args: PhantomData,
        }
    }
}

impl<Args> QueueStorage<Args> {
    /// The queue `config.queue` in `pool`, fetching `config.batch_size` jobs
    /// at a time until [`limit`](Self::limit) says otherwise.
    pub fn new(pool: &PgPool, config: Config) -> Self {
        Self {
            persistence: Persisted::new(Bookkeeping {
                pool: pool.clone(),
                config,
                slots: None,
                in_flight: None,
            }),
            codec: JsonCodec::default(),
            _args: PhantomData,
        }
    }

    /// The worker runs at most `slots` jobs at once (its `.concurrency`):
    /// fetch only as many as are free.
    pub fn limit(&mut self, slots: usize) {
        self.persistence.slots = Some(slots.max(1));
    }

    /// Keep alive the names of this process's failed workers of this queue
    /// while `in_flight` counts jobs of theirs still running (see
    /// [`crate::in_flight`]). The workers must count their jobs with
    /// `in_flight.layer()`.
    pub fn keep_alive(&mut self, in_flight: &InFlight) {
        self.persistence.in_flight = Some(in_flight.clone());
    }
}

/// How many jobs one fetch claims: the configured batch, or, for a worker
/// with `slots`, those not taken by the `running` ones (at least one: the
/// worker asks only once a slot is free).
fn fetch_size(batch: usize, slots: Option<usize>, running: usize) -> usize {
    match slots {
        None => batch.max(1),
        Some(slots) => slots.saturating_sub(running).max(1),
    }
}

/// How long a worker whose registration failed waits before it fails.
const REGISTER_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Bookkeeping {
    pool: PgPool,
    config: Config,
    slots: Option<usize>,
    in_flight: Option<InFlight>,
}

impl Bookkeeping {
    /// Stamp the names of this process's failed workers of this queue whose
    /// jobs still run here as seen now (see [`crate::in_flight`]).
    async fn stamp_retired<'c>(&self, conn: impl sqlx::PgExecutor<'c>) -> Result<(), Error> {
        let Some(names) = self.in_flight.as_ref().map(InFlight::retired) else {
            return Ok(());
        };
        if names.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "update apalis.workers set last_seen = now() \
              where worker_type = $1 and id = any($2)",
        )
        .bind(self.config.queue.as_ref())
        .bind(&names)
        .execute(conn)
        .await?;
        Ok(())
    }
}

impl Persistence for Bookkeeping {
    type Compact = Vec<u8>;
    type Response = Value;
    type Error = Error;

    async fn register(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        let queue = self.config.queue.as_ref();
        // apalis-postgres's registration (queries/worker/register.sql),
        // stamped with the database's clock, and with when it started
        // (`started_at`, which apalis leaves empty). Unlike it, no orphans
        // are looked for here (see `heartbeat`).
        let registered = sqlx::query(
            "insert into apalis.workers (id, worker_type, storage_name, layers, last_seen, started_at) \
             values ($1, $2, 'PgStorage', $3, now(), now()) \
             on conflict (id) do update set worker_type = excluded.worker_type, \
               storage_name = excluded.storage_name, layers = excluded.layers, last_seen = now(), \
               started_at = now() \
             where pg_try_advisory_lock(hashtext(workers.id))",
        )
        .bind(worker.name())
        .bind(queue)
        .bind(worker.get_service())
        .execute(&self.pool)
        .await;
        let registered = match registered {
            Ok(r) => r,
            Err(e) => {
                // The worker fails and the monitor starts it again at once
                // (`runtime`). While PostgreSQL refuses connections, which
                // it does without a wait, that was about 45 restarts a
                // second per worker (3,523 in a 7 s outage, each with its
                // warning); now about one.
                tokio::time::sleep(REGISTER_PAUSE).await;
                return Err(e.into());
            }
        };
        if registered.rows_affected() == 0 {
            return Err(Error::WorkerAlreadyExists(worker.name().to_owned()));
        }
        // Back after an outage: at once, not a heartbeat later.
        self.stamp_retired(&self.pool).await?;
        Ok(())
    }

    async fn heartbeat(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        let queue = self.config.queue.as_ref();
        let mut tx = self.pool.begin().await?;
        queries::keep_alive(&mut *tx, queue, worker).await?;
        // Before anything is judged orphaned.
        self.stamp_retired(&mut *tx).await?;
        reenqueue_orphaned(
            &mut tx,
            queue,
            worker.name(),
            self.config.orphaned_duration(),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fetch_next(&mut self, worker: &WorkerContext) -> Result<Vec<PgTask>, Error> {
        let count = fetch_size(self.config.batch_size, self.slots, worker.task_count());
        fetch(&self.pool, self.config.queue.as_ref(), worker.name(), count).await
    }

    async fn handle_events(
        &mut self,
        events: Vec<TaskEvent<Value>>,
        worker: &WorkerContext,
    ) -> Result<(), Error> {
        let completed: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                TaskEvent::Complete(result) => Some(result),
                _ => None,
            })
            .collect();
        let done: Vec<String> = completed.iter().map(|r| r.task_id().to_string()).collect();
        let locks: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                TaskEvent::Lock { task_id } => Some(task_id.to_string()),
                _ => None,
            })
            .filter(|id| !done.contains(id))
            .collect();
        if done.is_empty() && locks.is_empty() {
            return Ok(());
        }
        // Each statement commits on its own: they touch different jobs, and
        // neither needs the other (no BEGIN/COMMIT round trips).
        let mut conn = self.pool.acquire().await?;
        if !done.is_empty() {
            complete(&mut conn, &completed, &done, worker.name()).await?;
        }
        if !locks.is_empty() {
            queries::lock_tasks(&mut *conn, &locks, worker.name()).await?;
        }
        Ok(())
    }

    async fn reenqueue_abandoned(
        &mut self,
        tasks: Vec<PgTask>,
        worker: &WorkerContext,
    ) -> Result<u64, Error> {
        let ids: Vec<String> = tasks
            .iter()
            .filter_map(|t| t.task_id().map(|id| id.to_string()))
            .collect();
        let mut tx = self.pool.begin().await?;
        let count =
            queries::reenqueue_abandoned(&mut *tx, self.config.queue.as_ref(), worker.name(), &ids)
                .await?;
        if count as usize != tasks.len() {
            return Err(Error::ReenqueueMismatch {
                queued: tasks.len(),
                abandoned: count as usize,
            });
        }
        tx.commit().await?;
        Ok(count)
    }

    async fn push_tasks(&mut self, tasks: Vec<PgTask>) -> Result<(), Error> {
        let queue = self.config.queue.as_ref();
        let wake = match tasks.iter().find_map(|t| t.task_id()) {
            Some(id) => crate::jobs::Wake::job(queue, id),
            None => crate::jobs::Wake::queue(queue),
        };
        let mut tx = self.pool.begin().await?;
        queries::push_tasks(&mut *tx, queue, tasks).await?;
        tx.commit().await?;
        wake.send(&self.pool).await;
        Ok(())
    }
}

/// Claim up to `count` due jobs of `queue` for `worker`: apalis-postgres's
/// `get_jobs` written out as one statement. `get_jobs` is an SQL function,
/// and PostgreSQL plans the statements of an SQL function again on every
/// call (0.4 ms of planning per fetch in `pg_stat_statements`); a prepared
/// statement keeps its plan on the connection. It commits on its own.
/// Generations are taken by their account's turn before their run_at
/// (`generations::enqueue_in_turn`); other jobs have no turn.
/// Public for the test that compares a claimed job with its row.
pub async fn fetch(
    pool: &PgPool,
    queue: &str,
    worker: &str,
    count: usize,
) -> Result<Vec<PgTask>, Error> {
    let rows = sqlx::query(concat!(
        "with next as ( \
           select id from apalis.jobs \
            where ",
        crate::job_waiting!(),
        " and run_at < now() and job_type = $2 \
            order by priority desc, fair_tag asc nulls first, run_at asc \
            limit $3 \
            for update skip locked) \
         update apalis.jobs as jobs set status = 'Queued', lock_by = $1, lock_at = now() \
           from next where jobs.id = next.id \
         returning jobs.job, jobs.id, jobs.job_type, jobs.status, jobs.attempts, \
                   jobs.max_attempts, jobs.run_at, jobs.lock_at, jobs.lock_by, jobs.done_at, \
                   jobs.priority, jobs.idempotency_key, jobs.metadata",
    ))
    .bind(worker)
    .bind(queue)
    .bind(i32::try_from(count).unwrap_or(i32::MAX))
    .fetch_all(pool)
    .await?;
    rows.iter().map(task_from_row).collect()
}

/// Put back in `queue` the jobs held by workers silent for `dead_for`:
/// apalis-postgres's `reenqueue_orphaned` (queries/backend/
/// reenqueue_orphaned.sql), asked by worker `me`, which judges others dead
/// only once it has itself been up for `dead_for`. After PostgreSQL was out
/// of reach every worker's last beat is old, and each surviving process
/// needs that long to beat again (and to stamp its retired names, see
/// [`crate::in_flight`]); the first worker back would otherwise take their
/// running jobs for orphans and run them a second time beside the first.
async fn reenqueue_orphaned(
    conn: &mut sqlx::PgConnection,
    queue: &str,
    me: &str,
    dead_for: Duration,
) -> Result<u64, Error> {
    let requeued = sqlx::query(
        "with stale as ( \
           select jobs.id from apalis.jobs \
             join apalis.workers on jobs.lock_by = workers.id \
            where (jobs.status = 'Running' or jobs.status = 'Queued') \
              and now() - workers.last_seen >= make_interval(secs => $1) \
              and workers.worker_type = $2 \
              and exists (select 1 from apalis.workers me \
                           where me.id = $3 \
                             and me.started_at <= now() - make_interval(secs => $1)) \
              for update of jobs skip locked) \
         update apalis.jobs set status = 'Pending', done_at = null, lock_by = null, \
                lock_at = null, attempts = attempts + 1, \
                last_result = '{\"Err\": \"Re-enqueued due to worker heartbeat timeout.\"}' \
           from stale where apalis.jobs.id = stale.id",
    )
    .bind(dead_for.as_secs_f64())
    .bind(queue)
    .bind(me)
    .execute(conn)
    .await?
    .rows_affected();
    if requeued > 0 {
        tracing::info!(
            queue,
            jobs = requeued,
            "re-enqueued jobs held by workers that stopped heartbeating"
        );
    }
    Ok(requeued)
}

/// A claimed job row as apalis-postgres decodes it (its row type is private).
fn task_from_row(row: &PgRow) -> Result<PgTask, Error> {
    let seconds = |column: &str| -> Result<Option<u64>, Error> {
        let at: Option<DateTime<Utc>> = row.try_get(column)?;
        Ok(at.map(|t| u64::try_from(t.timestamp()).unwrap_or_default()))
    };
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let attempts: i32 = row.try_get("attempts")?;
    let max_attempts: Option<i32> = row.try_get("max_attempts")?;
    let priority: Option<i32> = row.try_get("priority")?;
    let metadata: Option<PgHstore> = row.try_get("metadata")?;
    let idempotency_key: Option<String> = row.try_get("idempotency_key")?;
    let mut task = TaskBuilder::new(row.try_get::<Vec<u8>, _>("job")?)
        .task_id(TaskId::from_ulid(Ulid::from_string(&id).map_err(|e| {
            Error::TaskIdError(TaskIdError::Decode(e.to_string()))
        })?))
        .queue(row.try_get::<String, _>("job_type")?.into())
        .status(Status::from_str(&status).map_err(Error::StatusError)?)
        .attempt(attempts.max(0) as usize)
        .max_attempts(max_attempts.map_or(25, |v| v.max(0) as usize))
        .run_at_timestamp(seconds("run_at")?.unwrap_or_default())
        .lock_at(seconds("lock_at")?)
        .done_at(seconds("done_at")?)
        .lock_by(row.try_get("lock_by")?)
        .priority(priority.map_or(0, |v| v.max(0) as usize))
        .with_metadata(MetadataStore::from_map(
            metadata
                .map(|m| {
                    m.into_iter()
                        .filter_map(|(k, v)| Some((k, v?)))
                        .collect::<HashMap<_, _>>()
                })
                .unwrap_or_default(),
        ));
    if let Some(key) = idempotency_key {
        task = task.idempotency_key(key);
    }
    Ok(task.build())
}

/// [`complete`] for one job that finished under `worker` after that worker
/// had failed (see [`crate::in_flight`]); whether its row was still the
/// worker's to complete. A database error comes back as sqlx's own:
/// apalis-postgres wraps it transparently (its `source()` is sqlx's source),
/// which would hide it from `slate_events::db::unavailable_in`.
pub(crate) async fn complete_one(
    pool: &PgPool,
    result: &queries::ResultPayload,
    worker: &str,
) -> anyhow::Result<bool> {
    let ids = [result.task_id().to_string()];
    let completed = async {
        let mut conn = pool.acquire().await?;
        complete(&mut conn, &[result], &ids, worker).await
    };
    match completed.await {
        Ok(rows) => Ok(rows == 1),
        Err(Error::Database(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

/// Record the results of `completed` jobs this worker holds: what
/// apalis-postgres's `handle_results` does, with a plan that stays an index
/// lookup. Its statement joins the jobs with the decoded results, which the
/// planner takes for 100 rows whatever their number, so it scanned every job
/// the worker had ever held (they keep their `lock_by`), or with statistics
/// the whole table, twice: 6-9 ms per completion at 20,000 jobs, growing
/// with the table. Here the jobs are found by their `ids` first.
async fn complete(
    conn: &mut sqlx::PgConnection,
    completed: &[&queries::ResultPayload],
    ids: &[String],
    worker: &str,
) -> Result<u64, Error> {
    let payload = serde_json::to_value(completed).map_err(Error::JsonError)?;
    let done = sqlx::query(
        "with r as ( \
           select value ->> 'task_id' as id, (value ->> 'attempt')::integer as attempt, \
                  value -> 'result' as result, value ->> 'status' as status \
           from jsonb_array_elements($1::jsonb) as value) \
         update apalis.jobs as jobs \
         set status = r.status, attempts = r.attempt, last_result = r.result, done_at = now() \
         from r \
         where jobs.id = any($3::text[]) and jobs.id = r.id and jobs.lock_by = $2",
    )
    .bind(payload)
    .bind(worker)
    .bind(ids)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

impl<Args> Backend for QueueStorage<Args> {
    type Task = PgTask;
    type Error = Error;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        let heartbeat = self.persistence.config.heartbeat_interval;
        self.persistence.poll_ready(cx, worker, heartbeat)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<PgTask, Error>>> {
        let next = self.persistence.poll_next(cx, worker);
        // An empty fetch parks the worker in `State::Ready` without polling
        // its heartbeat timer, which apalis-core polls only in `poll_ready`:
        // a timer that fired during the fetch has spent its wake-up, and the
        // worker would beat (and look for jobs) again only when something
        // else woke it. Polled here, it wakes the worker at the next beat
        // (or starts a beat that is due). See `crate::poll::Looks`.
        if next.is_pending()
            && matches!(self.persistence.state(), State::Ready)
            && let Poll::Ready(Err(e)) = self.poll_ready(cx, worker)
        {
            return Poll::Ready(Some(Err(e)));
        }
        next
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Result<(), Error>> {
        self.persistence.poll_close(cx, worker)
    }
}

impl<Args> BackendConfig for QueueStorage<Args> {
    type Args = Args;
    type Id = Ulid;
    type Kind = Durable;
    type Config = Config;
    type Layer = TaskPersistLayer<JsonCodec<Value>, Value>;

    fn config(&self) -> &Config {
        &self.persistence.config
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        let config = &self.persistence.config;
        let (persist, lock) = (config.persist_results, config.lock_tasks);
        // Sizes the channel of lock and completion events: as many as can
        // be fetched at once.
        let batch = config.batch_size.max(self.persistence.slots.unwrap_or(0));
        self.persistence
            .layer(JsonCodec::<Value>::default(), batch)
            .persist_results(persist)
            .lock_tasks(lock)
    }
}

impl<Args> WireFormatBackend for QueueStorage<Args> {
    type Codec = JsonCodec;
    type Compact = Vec<u8>;

    fn codec(&self) -> &JsonCodec {
        &self.codec
    }
}

#[cfg(test)]
mod tests {
    use super::fetch_size;

    #[test]
    fn a_limited_worker_fetches_its_free_slots() {
        assert_eq!(fetch_size(10, None, 0), 10);
        assert_eq!(fetch_size(10, None, 25), 10);
        assert_eq!(fetch_size(1, Some(8), 0), 8);
        assert_eq!(fetch_size(1, Some(8), 5), 3);
        assert_eq!(fetch_size(1, Some(8), 8), 1);
        assert_eq!(fetch_size(1, Some(8), 9), 1);
    }
}
