//! The generation job: call the selected provider, store the output in S3,
//! and record exactly one outcome — success with capture, or failure with
//! release. Transient errors are retried with backoff (the job's `run_at`
//! moves forward, so the backoff survives a crash); a handle the provider
//! gave is recorded, so a restarted worker polls instead of paying twice.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{Attempt, BoxDynError, Data, TaskId};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use slate_events::Metadata;
use slate_events::generations::{self, Generation, Output as StoredOutput, Submission, Submitted};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::jobs;
use crate::media;
use crate::providers::{Kind, Output, Polled, ProviderError, ProviderRequest, Providers, Started};
use crate::storage::Storage;

pub const QUEUE: &str = "slate.generations";

/// Ids only: the prompt stays in the database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenerationJob {
    pub generation_id: Uuid,
}

/// Reserve, record and enqueue, in the caller's transaction: a job exists
/// exactly when its reservation does. Send the wake-up once the caller has
/// committed.
pub async fn submit(
    conn: &mut PgConnection,
    submission: &Submission,
    metadata: &Metadata,
    max_attempts: usize,
) -> anyhow::Result<(Submitted, jobs::Wake)> {
    let outcome = generations::submit(conn, submission, metadata).await?;
    let wake = match outcome {
        Submitted::Accepted { .. } => {
            let job = GenerationJob {
                generation_id: submission.generation_id,
            };
            enqueue_in_turn(conn, submission.account_id, &job, max_attempts).await?
        }
        Submitted::Insufficient { .. } | Submitted::AccountDeleted => jobs::Wake::none(),
    };
    Ok((outcome, wake))
}

/// Push `job` onto the generation queue with its account's next turn, in
/// the caller's transaction (migration `…20261206000501`): the fetch takes
/// the lowest turn first, so accounts take turns and a large batch cannot
/// hold everyone else back. The turn is the account's last plus one (when
/// it has generations unfinished), and never earlier than the queue's
/// clock: the later of the latest turn among the jobs being worked on and
/// the earliest turn waiting that was never tried (with neither, the latest
/// turn given). A retried job keeps its early turn, and a job put back after
/// its worker died too: neither takes the clock back, which would let a
/// newcomer's whole batch overtake the accounts already waiting. (A job
/// never tried is always due, inserted at `now()`; saying so lets the read
/// step past retries backing off in the index alone: with 10,000 of them
/// ahead in turn order, 0.9 ms instead of 2.3 in psql.) Concurrent
/// submissions of one account are serialized by its credit reservation,
/// taken before this. One statement: the job is inserted with its turn
/// (apalis-postgres's own insert has no place for it).
async fn enqueue_in_turn(
    conn: &mut PgConnection,
    account_id: Uuid,
    job: &GenerationJob,
    max_attempts: usize,
) -> anyhow::Result<jobs::Wake> {
    let id = ulid::Ulid::generate().to_string();
    sqlx::query(concat!(
        "with clock as (
             select coalesce(
                 greatest(
                     (select max(fair_tag) from apalis.jobs
                       where job_type = $2 and status in ('Queued', 'Running')),
                     (select fair_tag from apalis.jobs
                       where job_type = $2 and fair_tag is not null and attempts = 0
                         and run_at < now() and ",
        crate::job_waiting!(),
        "
                       order by priority desc, fair_tag asc nulls first, run_at asc
                       limit 1)),
                 (select max(last_tag) from generation_turns),
                 0) as tag),
         turn as (
             insert into generation_turns (account_id, last_tag)
             values ($4, (select tag from clock))
             on conflict (account_id) do update
                set last_tag = case
                    when exists (select 1 from generations
                                  where account_id = $4 and generation_id <> $6
                                    and status in ('queued', 'running'))
                    then greatest(excluded.last_tag, generation_turns.last_tag + 1)
                    else excluded.last_tag end
             returning last_tag)
         insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority, fair_tag, idempotency_key)
         select $1, $2, $3, 'Pending', 0, $5, now(), 0, last_tag, $7 from turn",
    ))
    .bind(&id)
    .bind(QUEUE)
    .bind(serde_json::to_vec(job)?)
    .bind(account_id)
    .bind(i32::try_from(max_attempts).unwrap_or(i32::MAX))
    .bind(job.generation_id)
    .bind(job_key(job.generation_id))
    .execute(&mut *conn)
    .await?;
    Ok(jobs::Wake::job(QUEUE, id))
}

/// [`job_key`] in SQL, of the generation id expression `$id`.
macro_rules! job_key_sql {
    ($id:literal) => {
        concat!("'gen:' || ", $id)
    };
}

/// The key of generation `id`'s job (apalis's `idempotency_key`, unique per
/// queue): what finds the job from its generation through an index, to
/// withdraw it ([`withdraw`]) or to tell whether it still lives. Jobs
/// enqueued before the twenty-ninth session have none. The SQL that finds
/// jobs by their generations builds it with `job_key_sql!`.
pub fn job_key(id: Uuid) -> String {
    format!("gen:{id}")
}

/// The SQL `set` of a waiting job withdrawn ([`withdraw`]): done, never
/// taken (no `lock_at`, so the job-duration histogram leaves it out).
macro_rules! withdrawn {
    () => {
        "status = 'Done', done_at = now(), last_result = '{\"Ok\": \"withdrawn\"}'"
    };
}

/// A queued generation that ended before its job ran (canceled by its owner
/// or past its deadline) gives its turn back, in the caller's transaction,
/// after the outcome is recorded: its waiting job is marked done (it would
/// have been fetched at its turn only to end at once; never taken, it has
/// no `lock_at`, so the job-duration histogram leaves it out), and its account's
/// last turn goes back to the latest turn of the account's generations
/// still unfinished. An account that canceled most of a batch while one of
/// its generations ran used to have its next submission queued behind
/// every canceled turn, everyone else's work in those rounds going first.
/// Returns whether a job was withdrawn (none for a job enqueued before
/// [`job_key`], or one already taken by a worker, which ends it itself).
pub async fn withdraw(conn: &mut PgConnection, g: &Generation) -> anyhow::Result<bool> {
    let withdrawn: i64 = sqlx::query_scalar(concat!(
        "with gone as (
             update apalis.jobs set ",
        withdrawn!(),
        "
              where job_type = $1 and idempotency_key = $2 and ",
        crate::job_waiting!(),
        "
              returning 1),
         turns as (
         update generation_turns t
            set last_tag = coalesce(
                (select max(j.fair_tag) from generations g
                   join apalis.jobs j on j.job_type = $1 and j.idempotency_key = ",
        job_key_sql!("g.generation_id"),
        "
                  where g.account_id = $3 and g.generation_id <> $4
                    and g.status in ('queued', 'running')),
                t.last_tag)
          where t.account_id = $3 and exists (select 1 from gone))
         select count(*) from gone",
    ))
    .bind(QUEUE)
    .bind(job_key(g.generation_id))
    .bind(g.account_id)
    .bind(g.generation_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(withdrawn > 0)
}

/// [`withdraw`] the waiting jobs of every generation of `account_id` that
/// ended canceled before its job ran, in the caller's transaction: what an
/// account's deletion leaves (it cancels the account's queued generations,
/// in `slate_events`, which knows nothing of the queue). Their jobs were
/// left to be fetched at their turns, each only to end at once. Returns how
/// many were withdrawn.
pub async fn withdraw_canceled(conn: &mut PgConnection, account_id: Uuid) -> anyhow::Result<u64> {
    let withdrawn = sqlx::query(concat!(
        "update apalis.jobs set ",
        withdrawn!(),
        "
          where job_type = $1
            and idempotency_key in (select ",
        job_key_sql!("generation_id"),
        " from generations
                                     where account_id = $2 and status = 'canceled')
            and ",
        crate::job_waiting!(),
    ))
    .bind(QUEUE)
    .bind(account_id)
    .execute(&mut *conn)
    .await?;
    Ok(withdrawn.rows_affected())
}

/// Where a generation's output lives.
pub fn output_key(g: &Generation, content_type: &str) -> String {
    format!(
        "{}collections/{}/{}.{}",
        crate::storage::account_prefix(g.account_id),
        g.collection_id,
        g.generation_id,
        media::extension_for(content_type)
    )
}

#[derive(Clone)]
pub struct GenerationWorker {
    pub pool: PgPool,
    pub providers: Arc<Providers>,
    pub storage: Storage,
    pub max_attempts: usize,
    pub poll_interval: Duration,
    /// Give up polling a provider after this long (the attempt fails
    /// transiently and is retried).
    pub poll_timeout: Duration,
    /// Results' size cap, and the memory a process's results in flight may
    /// hold together.
    pub downloads: Downloads,
    /// Fetches results from the addresses providers answer with; build it
    /// with [`media_client`] (redirects are followed by [`download`], each
    /// checked).
    pub http: reqwest::Client,
    /// Result hosts (or host:port) allowed although they resolve to private
    /// or loopback addresses, or serve plain http (tests, a local provider).
    pub media_allow: Vec<String>,
}

const MIB: usize = 1 << 20;

/// What results fetched from providers' addresses may take. A result is
/// held whole, to be probed and stored, so each is capped (`limit`), and
/// all of a process's results in flight together hold at most `memory`:
/// a result beyond it waits for the others to be stored (a process running
/// many generations at once would otherwise hold up to the cap for each,
/// and be killed for it with every generation it was running). A result
/// whose size is not announced counts as the cap. Clones share the budget.
/// Results a provider answers with inline (a synchronous provider's audio
/// or text, read by its client) are not counted: they are small.
#[derive(Clone, Debug)]
pub struct Downloads {
    limit: usize,
    memory: Arc<tokio::sync::Semaphore>,
    memory_mib: u32,
}

impl Downloads {
    /// `limit` bytes a result, `memory` bytes all of them (at least 1 MiB;
    /// a result's share is rounded up to whole MiB). A `memory` below
    /// `limit` lowers the cap to it.
    pub fn new(limit: usize, memory: usize) -> Self {
        let memory_mib = u32::try_from(memory.div_ceil(MIB))
            .unwrap_or(u32::MAX)
            .clamp(1, 1 << 28);
        Self {
            limit: limit.min(memory_mib as usize * MIB),
            memory: Arc::new(tokio::sync::Semaphore::new(memory_mib as usize)),
            memory_mib,
        }
    }

    /// A result's size cap.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// `bytes` in whole MiB, at most the whole budget.
    fn share(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(MIB))
            .unwrap_or(u32::MAX)
            .clamp(1, self.memory_mib)
    }

    /// Take `bytes` of the budget if they are free now; given back when the
    /// permit is dropped.
    pub fn try_reserve(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.memory
            .clone()
            .try_acquire_many_owned(self.share(bytes))
            .ok()
    }

    /// Take `bytes` of the budget, waiting until they are free. (The budget
    /// is never closed, so there is no `Err` in practice.)
    pub async fn reserve(
        &self,
        bytes: usize,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError> {
        if let Some(permit) = self.try_reserve(bytes) {
            return Ok(permit);
        }
        let mib = self.share(bytes);
        tracing::info!(
            mib,
            "a result waits for memory (the results in flight hold SLATE_RESULT_MEMORY_MB)"
        );
        self.memory.clone().acquire_many_owned(mib).await
    }
}

/// The client a [`GenerationWorker`] fetches results with: it follows no
/// redirect by itself, so that each one is checked before it is taken.
pub fn media_client() -> reqwest::Result<reqwest::Client> {
    media_client_builder().build()
}

fn media_client_builder() -> reqwest::ClientBuilder {
    // No proxy from the environment: a proxy resolves the host itself, past
    // the checked addresses a download is pinned to.
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(300))
}

/// Redirects a result's download follows at most.
const MEDIA_REDIRECTS: usize = 3;

enum Step {
    /// Try again later (transient).
    Retry(&'static str),
    /// Fail for good with this reason code.
    Fatal(String),
}

impl From<ProviderError> for Step {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Transient(_) => Step::Retry("provider_unavailable"),
            ProviderError::Timeout => Step::Retry("provider_timeout"),
            ProviderError::Permanent { code, .. } => Step::Fatal(code.to_owned()),
        }
    }
}

impl From<slate_events::Error> for Step {
    fn from(e: slate_events::Error) -> Self {
        let e = anyhow::Error::from(e);
        tracing::warn!(error = %format_args!("{e:#}"), "database step failed");
        Step::Retry("database_unavailable")
    }
}

impl From<sqlx::Error> for Step {
    fn from(e: sqlx::Error) -> Self {
        slate_events::Error::from(e).into()
    }
}

fn system() -> Metadata {
    Metadata::system()
}

/// What one attempt ended in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The generation is finished (succeeded, failed, canceled) or was already.
    Finished,
    /// A transient problem: run again after this delay.
    RetryAfter(Duration, String),
}

/// One attempt of a generation, as the job runs it (tests call it directly
/// to run queued work in place). Never panics: a panic inside fails the
/// generation and releases its credits.
pub async fn attempt(w: &GenerationWorker, id: Uuid, n: i32) -> AttemptOutcome {
    attempt_of(w, id, n, w.max_attempts).await
}

/// [`attempt`] `n` of a job that has `max_attempts` in all: the last one
/// fails the generation rather than ask for a retry.
pub async fn attempt_of(
    w: &GenerationWorker,
    id: Uuid,
    n: i32,
    max_attempts: usize,
) -> AttemptOutcome {
    let run = AssertUnwindSafe(run(w, id, n)).catch_unwind().await;
    let code = match run {
        Ok(Ok(())) => return AttemptOutcome::Finished,
        Ok(Err(Step::Retry(code))) if (n as usize) < max_attempts => {
            return AttemptOutcome::RetryAfter(jobs::backoff(n as usize), code.to_owned());
        }
        Ok(Err(Step::Retry(code))) => code.to_owned(),
        Ok(Err(Step::Fatal(code))) => code,
        Err(_) => {
            tracing::error!("generation attempt panicked; failing the generation");
            "internal_error".to_owned()
        }
    };
    fail(w, id, &code, n).await;
    AttemptOutcome::Finished
}

#[tracing::instrument(level = "error", skip_all, fields(job_id = %task_id, generation_id = %job.generation_id, attempt = attempt_no.current()))]
pub async fn handle(
    job: GenerationJob,
    task_id: TaskId,
    attempt_no: Attempt,
    max_attempts: jobs::MaxAttempts,
    worker: Data<GenerationWorker>,
) -> Result<(), BoxDynError> {
    let n = attempt_no.current().max(1) as i32;
    // The job's own limit, written when it was enqueued (the web's
    // `SLATE_GENERATION_ATTEMPTS`, or a stop job's), not this process's.
    let max_attempts = max_attempts.0.unwrap_or(worker.max_attempts);
    match attempt_of(&worker, job.generation_id, n, max_attempts).await {
        AttemptOutcome::Finished => Ok(()),
        AttemptOutcome::RetryAfter(delay, code) => {
            tracing::warn!(reason = %code, retry_in_s = delay.as_secs(), "generation will be retried");
            jobs::retry_later(&worker.pool, &task_id.to_string(), delay).await?;
            Err(code.into())
        }
    }
}

/// Record the terminal failure and release the credits. No attempt follows
/// this one, so a short outage is waited out (the commonest last-attempt
/// failure is PostgreSQL out of reach, and it may still be): given up, the
/// generation would stay running with no job left to finish it. Recording
/// it twice is harmless (the outcome's event id is the generation's).
///
/// A provider job the generation had submitted is to be stopped (one that
/// finished is left as it is): after the last attempt gave up on it, nobody
/// would fetch its result, and it would go on being billed. A stop job is
/// queued with the failure, in its transaction, as the sweep does for the
/// generations it ends: asked from here, after the commit, the request was
/// lost to a provider error or a crash in between.
async fn fail(worker: &GenerationWorker, id: Uuid, code: &str, attempts: i32) {
    let result = while_out_of_reach("record_failure", || async {
        let mut tx = worker.pool.begin().await?;
        let (mut wake, mut stop) = (jobs::Wake::none(), jobs::Wake::none());
        let mut failed = false;
        if let Some(g) = generations::get_any(&mut tx, id).await?
            && generations::fail(&mut tx, &g, code, attempts, &system()).await?
        {
            failed = true;
            wake = crate::webhooks::enqueue_for(&mut tx, id).await?;
            if g.provider_handle.is_some() {
                stop = enqueue_stop(&mut tx, id).await?;
            }
        }
        tx.commit().await?;
        wake.send(&worker.pool).await;
        stop.send(&worker.pool).await;
        Ok::<_, anyhow::Error>(failed)
    })
    .await;
    match result {
        Ok(true) => tracing::info!(reason = code, "generation failed; credits released"),
        Ok(false) => {}
        // The reservation's hold expiry still releases the credits.
        Err(e) => tracing::error!(error = %e, "recording the failure failed"),
    }
}

/// Ask the provider to stop `g`'s job now and, where it cannot be reached,
/// leave that to a stop job (not from a stop job: it would find itself).
async fn stop_now_or_later(w: &GenerationWorker, g: &Generation, handle: &str) -> Result<(), Step> {
    if stop_provider_job(w, &g.provider, handle).await.is_err() {
        let job = GenerationJob {
            generation_id: g.generation_id,
        };
        let key = stop_job_key(g.generation_id);
        jobs::enqueue_once(&w.pool, QUEUE, &job, STOP_ATTEMPTS, &key)
            .await
            .map_err(|_| Step::Retry("database_unavailable"))?;
    }
    Ok(())
}

/// Attempts of a job that stops an ended generation's provider job: the
/// waits double from 2 s to the ten-minute ceiling, about 40 minutes in all
/// (a provider's outage, or its rate limit, is waited out that long).
pub const STOP_ATTEMPTS: usize = 12;

/// Queue the job that stops generation `id`'s provider job ([`stop_job_key`];
/// `run` finds the generation ended and asks the provider), in the
/// transaction that ended it: one per generation, which ends once.
async fn enqueue_stop(conn: &mut PgConnection, id: Uuid) -> anyhow::Result<jobs::Wake> {
    let job = GenerationJob { generation_id: id };
    Ok(jobs::enqueue_keyed(conn, QUEUE, &job, STOP_ATTEMPTS, &stop_job_key(id)).await?)
}

/// Ask the provider to stop the job of a generation that ended unfinished
/// (one that finished is left as it is): nobody will fetch its result, and
/// it would go on being billed. A provider that could not be reached, or
/// did not answer in time, is asked again by the job's next attempt; one
/// that refused is not.
async fn stop_provider_job(w: &GenerationWorker, provider: &str, handle: &str) -> Result<(), Step> {
    let Some(provider) = w.providers.get(provider) else {
        return Ok(());
    };
    match provider.cancel(handle).await {
        Ok(()) => Ok(()),
        Err(e @ (ProviderError::Transient(_) | ProviderError::Timeout)) => {
            tracing::warn!(error = %e.code(), "the provider could not be asked to stop the ended generation's job; asking again later");
            Err(Step::Retry("provider_unavailable"))
        }
        Err(e) => {
            tracing::warn!(error = %e.code(), "the provider refused to stop the ended generation's job");
            Ok(())
        }
    }
}

async fn run(w: &GenerationWorker, id: Uuid, attempt: i32) -> Result<(), Step> {
    let mut conn = w.pool.acquire().await?;
    let Some(mut work) = generations::work(&mut conn, id).await? else {
        return Ok(());
    };
    let g = &work.generation;
    if g.is_terminal() {
        // Ended unfinished while this job waited for its retry (the sweep
        // cancels one past its deadline, and has no provider to tell), or
        // failed by the sweep as `job_lost`, which queues this job for
        // that: its provider job may still run.
        if g.status != "succeeded"
            && let Some(handle) = &g.provider_handle
        {
            drop(conn);
            stop_provider_job(w, &g.provider, handle).await?;
        }
        return Ok(());
    }
    if g.deadline.is_some_and(|d| d <= chrono::Utc::now()) {
        drop(conn);
        // An earlier attempt's provider job may still run: a stop job is
        // queued with the cancellation.
        cancel(w, g, "deadline_passed", g.provider_handle.is_some()).await?;
        return Ok(());
    }
    if g.cancel_requested && g.provider_handle.is_none() {
        cancel(w, g, "canceled", false).await?;
        return Ok(());
    }
    match generations::record_started(&mut conn, g, attempt, &system()).await? {
        generations::Start::Running => {}
        // Canceled after it was read: no provider call.
        generations::Start::Finished => return Ok(()),
        // Its cancellation was asked for after it was read (a retry that
        // waited): no provider call either.
        generations::Start::CancelRequested => {
            drop(conn);
            cancel(w, g, "canceled", false).await?;
            return Ok(());
        }
    }
    // No connection is held while the provider works (minutes, for video):
    // the worker's concurrency is not bounded by its pool.
    drop(conn);
    let provider = w
        .providers
        .get(&g.provider)
        .ok_or_else(|| Step::Fatal("provider_unavailable".into()))?;
    let kind: Kind = serde_json::from_value(serde_json::Value::String(g.kind.clone()))
        .map_err(|_| Step::Fatal("invalid_parameters".into()))?;

    let output = match &g.provider_handle {
        Some(handle) => poll(w, provider, g, handle).await?,
        None => {
            let input_url = match &work.input_key {
                Some(key) => Some(
                    w.storage
                        .presign_get(key, Duration::from_secs(3600))
                        .await
                        .map_err(|_| Step::Retry("storage_unavailable"))?,
                ),
                None => None,
            };
            let request = ProviderRequest {
                kind,
                prompt: work.prompt.take(),
                input_url,
                parameters: std::mem::take(&mut work.parameters),
            };
            match provider.start(&request).await? {
                Started::Done(output) => output,
                Started::Pending { handle } => {
                    // The recorded handle is what keeps a later attempt from
                    // submitting (and paying) again: wait out a short
                    // outage rather than drop it.
                    let handle = &handle;
                    patiently("record_submitted", || async move {
                        let mut conn = w.pool.acquire().await?;
                        generations::record_submitted(&mut conn, g, handle, &system()).await?;
                        Ok(())
                    })
                    .await?;
                    poll(w, provider, g, handle).await?
                }
            }
        }
    };
    let stored = store_output(w, g, output).await?;
    // The output is paid for and stored: an attempt that gave up here would
    // run the provider again (a synchronous one would be paid again), so a
    // short outage is waited out. Recording it twice is harmless (its event
    // id is the generation's outcome id; the second finds it recorded).
    let (stored, notify) = (&stored, work.webhook_url.is_some());
    let (first, wake) = patiently("record_outcome", || async move {
        let mut tx = w.pool.begin().await?;
        let first = generations::succeed(&mut tx, g, stored, &system()).await?;
        let mut wake = crate::jobs::Wake::none();
        if first {
            wake = crate::webhooks::enqueue_if(&mut tx, g.generation_id, notify).await?;
        }
        tx.commit().await?;
        Ok((first, wake))
    })
    .await?;
    wake.send(&w.pool).await;
    if first {
        tracing::info!(
            bytes = stored.bytes,
            "generation succeeded; credits captured"
        );
    }
    Ok(())
}

/// How long an attempt waits for PostgreSQL to come back when what it is
/// about to record cannot be had again for free (a provider's handle, a
/// paid output). Beyond it the attempt is retried later, as for any other
/// database failure.
pub const DB_PATIENCE: Duration = Duration::from_secs(60);

/// PostgreSQL is out of reach for now ([`slate_events::db::unavailable_in`]:
/// down, restarting, refusing connections, the pool timing out), and the
/// pool is not closed (which means the process is stopping).
fn out_of_reach(e: &(dyn std::error::Error + 'static)) -> bool {
    slate_events::db::unavailable_in(e) && !slate_events::db::closed_in(e)
}

/// Run `step` again while it fails because PostgreSQL is out of reach
/// ([`out_of_reach`]), pausing 0.25 s, then twice as long each time up to
/// 5 s, for at most [`DB_PATIENCE`]; the last error otherwise. `step` must
/// be safe to run again after a failure, including a commit whose answer
/// was lost. Also what a job that outlived its worker records its
/// completion with (`crate::in_flight`).
pub(crate) async fn while_out_of_reach<T, F: Future<Output = anyhow::Result<T>>>(
    what: &'static str,
    step: impl FnMut() -> F,
) -> anyhow::Result<T> {
    retry_while(what, |e| out_of_reach(e.as_ref()), step).await
}

/// Run `step` again while its error is `worth_retrying`, pausing 0.25 s,
/// then twice as long each time up to 5 s, for at most [`DB_PATIENCE`];
/// the last error otherwise.
async fn retry_while<T, F: Future<Output = anyhow::Result<T>>>(
    what: &'static str,
    worth_retrying: impl Fn(&anyhow::Error) -> bool,
    mut step: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    loop {
        let e = match step().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !worth_retrying(&e) || started.elapsed() + pause > DB_PATIENCE {
            return Err(e);
        }
        tracing::warn!(
            step = what,
            error = %format_args!("{e:#}"),
            retry_in_ms = pause.as_millis() as u64,
            "out of reach; trying again"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// [`while_out_of_reach`]; any other error, or running out of patience, is
/// the usual transient `database_unavailable`.
async fn patiently<T, F: Future<Output = anyhow::Result<T>>>(
    what: &'static str,
    step: impl FnMut() -> F,
) -> Result<T, Step> {
    while_out_of_reach(what, step).await.map_err(|e| {
        tracing::warn!(step = what, error = %format_args!("{e:#}"), "database step failed");
        Step::Retry("database_unavailable")
    })
}

/// End `g` canceled, its credits released, and with `stop`, queue the job
/// that stops its provider job (one the provider was not told of, or not
/// reached for). Found ended already (the sweep canceled it past its
/// deadline, and left its provider job to this job, which lives), the
/// provider is asked now, or left to a stop job when it cannot be reached.
async fn cancel(
    w: &GenerationWorker,
    g: &Generation,
    reason: &str,
    stop: bool,
) -> Result<(), Step> {
    let mut tx = w.pool.begin().await?;
    let (mut wake, mut stopping) = (jobs::Wake::none(), jobs::Wake::none());
    let ended = generations::cancel_now(&mut tx, g, reason, &system()).await?;
    if ended {
        let enqueued = async {
            wake = crate::webhooks::enqueue_for(&mut tx, g.generation_id).await?;
            if stop {
                stopping = enqueue_stop(&mut tx, g.generation_id).await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        enqueued
            .await
            .map_err(|_| Step::Retry("database_unavailable"))?;
    }
    tx.commit().await?;
    wake.send(&w.pool).await;
    stopping.send(&w.pool).await;
    if stop
        && !ended
        && let Some(handle) = &g.provider_handle
    {
        stop_now_or_later(w, g, handle).await?;
    }
    Ok(())
}

async fn poll(
    w: &GenerationWorker,
    provider: &crate::providers::Provider,
    g: &Generation,
    handle: &str,
) -> Result<Output, Step> {
    let started = tokio::time::Instant::now();
    let mut unanswered = 0u32;
    loop {
        match provider.poll(handle).await {
            Ok(Polled::Done(output)) => return Ok(output),
            Ok(Polled::Running) => unanswered = 0,
            // A status the provider could not give this time (a 5xx, a 429,
            // a timeout) is asked for again at the next poll, for as long as
            // the attempt polls. Ending the attempt over it spent one of the
            // generation's few retries, seconds apart, on a blip while the
            // provider worked on: a short incident failed the generation
            // and threw away the video the provider went on to bill for.
            Err(ProviderError::Transient(_) | ProviderError::Timeout) => {
                unanswered += 1;
                if unanswered == 1 || unanswered.is_power_of_two() {
                    tracing::warn!(
                        unanswered,
                        "the provider did not answer a status request; asking again"
                    );
                }
            }
            // Canceled at the provider, as its owner asked (an attempt
            // asked the provider, and could not record the cancellation
            // before it ended): canceled, as asked, not failed.
            Err(e) if e.code() == crate::providers::codes::CANCELLED => {
                let asked = g.cancel_requested
                    || status_now(w, g.generation_id)
                        .await
                        .map_err(|_| Step::Retry("database_unavailable"))?
                        .is_some_and(|c| c.cancel_requested);
                if !asked {
                    return Err(e.into());
                }
                cancel(w, g, "canceled", false).await?;
                return Err(Step::Fatal("canceled".into()));
            }
            Err(e) => return Err(e.into()),
        }
        // Canceled meanwhile? Tell the provider; unless it already finished,
        // the generation ends canceled and unbilled. With PostgreSQL out of
        // reach the check waits for the next poll: ending the attempt over
        // it would spend one of the generation's retries while the provider
        // works on.
        let current = match status_now(w, g.generation_id).await {
            Ok(current) => current,
            Err(e) if out_of_reach(&e) => {
                let e = anyhow::Error::from(e);
                tracing::warn!(error = %format_args!("{e:#}"), "cancellation check skipped; database out of reach");
                None
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(c) = current {
            // Ended meanwhile (the sweep, past its deadline).
            if c.is_terminal() {
                stop_now_or_later(w, g, handle).await?;
                return Err(Step::Fatal(c.status));
            }
            if c.cancel_requested {
                let told = stop_provider_job(w, &g.provider, handle).await.is_ok();
                // Finished anyway? Then it is billed; otherwise released.
                if let Ok(Polled::Done(output)) = provider.poll(handle).await {
                    return Ok(output);
                }
                cancel(w, g, "canceled", !told).await?;
                return Err(Step::Fatal("canceled".into()));
            }
        }
        if started.elapsed() > w.poll_timeout {
            return Err(Step::Retry("provider_timeout"));
        }
        tokio::time::sleep(w.poll_interval).await;
    }
}

/// The generation as it is now (its status and whether a cancel was asked).
async fn status_now(
    w: &GenerationWorker,
    id: Uuid,
) -> Result<Option<Generation>, slate_events::Error> {
    let mut conn = w.pool.acquire().await?;
    generations::get_any(&mut conn, id).await
}

async fn store_output(
    w: &GenerationWorker,
    g: &Generation,
    output: Output,
) -> Result<StoredOutput, Step> {
    // Held until the result is stored (see `Downloads`).
    let mut _memory = None;
    let (bytes, content_type) = match output {
        Output::MediaBytes {
            bytes,
            content_type,
        } => (bytes, content_type),
        Output::Text { text } => (text.into_bytes(), "text/plain; charset=utf-8".to_owned()),
        Output::MediaUrl { url, content_type } => {
            let (bytes, memory) = download(w, &url).await?;
            _memory = Some(memory);
            let content_type = content_type
                .or_else(|| media::sniff_content_type(&bytes).map(str::to_owned))
                .unwrap_or_else(|| "application/octet-stream".to_owned());
            (bytes, content_type)
        }
    };
    let base_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let info = media::probe(&bytes, &base_type);
    let key = output_key(g, &base_type);
    let size = bytes.len() as i64;
    // The output is paid for: a storage outage is waited out, as
    // PostgreSQL's is for the outcome's record, rather than end the attempt,
    // whose retry would call the provider again (and pay a synchronous one
    // again).
    let body = bytes::Bytes::from(bytes);
    retry_while(
        "store_output",
        |_| true,
        || w.storage.put(&key, body.clone(), &content_type),
    )
    .await
    .map_err(|_| Step::Retry("storage_unavailable"))?;
    Ok(StoredOutput {
        key,
        content_type,
        bytes: size,
        width: info.width.map(|v| v as i32),
        height: info.height.map(|v| v as i32),
        duration_ms: info.duration_ms.map(|v| v as i64),
    })
}

/// Fetch a provider's result, streamed with a size cap. Its address comes
/// from the provider's answer, so it is checked before it is fetched, as is
/// every redirect it takes (at most [`MEDIA_REDIRECTS`]): https, resolving
/// only to public addresses, unless its host is on the allow-list. A result
/// cannot point the worker at an internal service and have the answer
/// stored for the user (`output_refused`). An empty body is no result; one
/// announced larger than the cap is not fetched (`output_too_large`). The
/// result comes with its share of the memory budget (see [`Downloads`]).
async fn download(
    w: &GenerationWorker,
    url: &str,
) -> Result<(Vec<u8>, tokio::sync::OwnedSemaphorePermit), Step> {
    let limit = w.downloads.limit();
    // Memory waited for when the first answer did not fit: asked again
    // once it is free, rather than wait with a response open (its timeout
    // runs until its body is read, and its host may close it meanwhile).
    let mut waited: Option<(tokio::sync::OwnedSemaphorePermit, usize)> = None;
    for _ in 0..3 {
        let response = fetch_result(w, url).await?;
        let announced = response
            .content_length()
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        if announced.is_some_and(|n| n > limit) {
            return Err(Step::Fatal("output_too_large".into()));
        }
        let need = announced.unwrap_or(limit);
        let memory = match waited.take() {
            Some((permit, reserved)) if reserved >= need => Some(permit),
            // None yet, or the result grew since: what it needs now.
            _ => w.downloads.try_reserve(need),
        };
        let Some(memory) = memory else {
            drop(response);
            let permit = w
                .downloads
                .reserve(need)
                .await
                .map_err(|_| Step::Retry("provider_unavailable"))?;
            waited = Some((permit, need));
            continue;
        };
        return read_result(response, limit, announced)
            .await
            .map(|bytes| (bytes, memory));
    }
    // Larger at every asking.
    Err(Step::Retry("provider_unavailable"))
}

/// The result at `url`, its headers read (see [`download`]).
async fn fetch_result(w: &GenerationWorker, url: &str) -> Result<reqwest::Response, Step> {
    let refused = || Step::Fatal("output_refused".into());
    let mut url = reqwest::Url::parse(url).map_err(|_| refused())?;
    let mut redirects = 0;
    let response = loop {
        let resolved = check_media_url(&url, &w.media_allow).await?;
        let client = crate::webhooks::pinned(&w.http, media_client_builder, &url, &resolved)
            .map_err(|_| Step::Retry("provider_unavailable"))?;
        let response = client
            .get(url.clone())
            .send()
            .await
            .map_err(|_| Step::Retry("provider_unavailable"))?;
        if !response.status().is_redirection() {
            break response;
        }
        redirects += 1;
        url = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url.join(l).ok())
            .filter(|_| redirects <= MEDIA_REDIRECTS)
            .ok_or_else(refused)?;
    };
    let status = response.status();
    if !status.is_success() {
        // A result host that is busy (5xx, 429) or timed out waiting for the
        // request (408) may serve it later; any other answer will not.
        return Err(
            if status.is_server_error() || matches!(status.as_u16(), 408 | 429) {
                Step::Retry("provider_unavailable")
            } else {
                Step::Fatal("output_unavailable".into())
            },
        );
    }
    Ok(response)
}

/// A result's body, at most `limit` bytes; an empty one is no result.
async fn read_result(
    mut response: reqwest::Response,
    limit: usize,
    announced: Option<usize>,
) -> Result<Vec<u8>, Step> {
    let mut bytes = Vec::with_capacity(announced.unwrap_or(0));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|_| Step::Retry("provider_unavailable"))?
    {
        if bytes.len() + chunk.len() > limit {
            return Err(Step::Fatal("output_too_large".into()));
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(Step::Fatal("output_unavailable".into()));
    }
    Ok(bytes)
}

/// A result's address (see [`download`]), and the addresses it resolved to
/// (none on the allow-list). A name that does not resolve now may later:
/// tried again.
async fn check_media_url(
    url: &reqwest::Url,
    allow: &[String],
) -> Result<Vec<std::net::SocketAddr>, Step> {
    use crate::webhooks::{UrlError, check_host, on_allow_list};
    let refused = || Step::Fatal("output_refused".into());
    if url.scheme() != "https" && !on_allow_list(url, allow) {
        return Err(refused());
    }
    match check_host(url, allow).await {
        Ok(resolved) => Ok(resolved),
        Err(UrlError::Unresolvable) => Err(Step::Retry("provider_unavailable")),
        Err(_) => Err(refused()),
    }
}

/// Cancel generations past their deadline (run by the sweeper).
pub async fn cancel_overdue(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<usize> {
    let mut conn = pool.acquire().await?;
    let ids = generations::overdue(&mut conn, now, 500).await?;
    drop(conn);
    let mut n = 0;
    for id in ids {
        n += usize::from(end_unfinished(pool, id, Ending::DeadlinePassed).await?);
    }
    Ok(n)
}

/// How the sweep ends an unfinished generation.
enum Ending {
    /// Canceled, unbilled (`deadline_passed`).
    DeadlinePassed,
    /// Failed, its credits released (`job_lost`).
    JobLost,
}

/// End generation `id` if it is still unfinished, under its lock, with its
/// completion webhook; whether this ended it.
async fn end_unfinished(pool: &PgPool, id: Uuid, ending: Ending) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    generations::lock(&mut tx, id).await?;
    let mut wake = crate::jobs::Wake::none();
    let mut stop = crate::jobs::Wake::none();
    let mut ended = false;
    if let Some(g) = generations::get_any(&mut tx, id).await?
        && !g.is_terminal()
    {
        ended = match ending {
            Ending::DeadlinePassed => {
                generations::cancel_now(&mut tx, &g, "deadline_passed", &system()).await?
            }
            Ending::JobLost => {
                generations::fail(&mut tx, &g, "job_lost", g.attempts, &system()).await?
            }
        };
        if ended {
            wake = crate::webhooks::enqueue_for(&mut tx, id).await?;
        }
        if ended && g.status == "queued" && matches!(ending, Ending::DeadlinePassed) {
            withdraw(&mut tx, &g).await?;
        }
        // The provider job of a generation that ended unfinished may still
        // run, billed, and the sweep has no providers to stop it: a job is
        // queued that finds the generation ended and asks its provider to
        // stop (`run`). A lost job's generation has no job left by
        // definition. One past its deadline usually has a job of its own,
        // which does so at its next attempt; not when that job had died
        // (killed, or out of attempts) within `ABANDONED_AFTER`, before the
        // abandoned-job sweep would have failed it (its provider job ran on).
        if ended
            && g.provider_handle.is_some()
            && (matches!(ending, Ending::JobLost) || !job_lives(&mut tx, id).await?)
        {
            stop = enqueue_stop(&mut tx, id).await?;
        }
    }
    tx.commit().await?;
    wake.send(pool).await;
    stop.send(pool).await;
    Ok(ended)
}

/// Whether generation `id`'s own job is still live ([`job_live!`]): waiting,
/// or taken by a worker. A job enqueued before [`job_key`] has no key and
/// reads as gone (at worst its provider is asked to stop twice).
async fn job_lives(conn: &mut PgConnection, id: Uuid) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(concat!(
        "select exists (select 1 from apalis.jobs
                         where job_type = $1 and idempotency_key = $2 and ",
        crate::job_live!(),
        ")",
    ))
    .bind(QUEUE)
    .bind(job_key(id))
    .fetch_one(conn)
    .await?)
}

/// The key of the job that stops an ended generation `id`'s provider job (its
/// second job; the chaos check tells it from a duplicate by it).
pub fn stop_job_key(id: Uuid) -> String {
    format!("stop:{id}")
}

/// How long a generation may stay unfinished with no job left to finish it
/// before the sweep fails it: longer than a job's own bookkeeping between
/// recording an outcome and being marked done.
pub const ABANDONED_AFTER: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// Fail the generations still queued or running, unchanged for
/// [`ABANDONED_AFTER`], whose job is gone: none of theirs is waiting,
/// running, or failed with attempts to go. That happens when an attempt's
/// last word could not be recorded (PostgreSQL out of reach for longer than
/// the attempt waits for it) or the job was killed or deleted; such a
/// generation stayed `running` for good, its hold released at its expiry
/// but its status, stream and completion webhook never settled. The failure
/// (`job_lost`) releases what is still reserved, as any failure does.
/// Returns how many were failed.
pub async fn fail_abandoned(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<usize> {
    // The live jobs' generations are read once (the queue's unfinished
    // jobs, through their partial index), not once per generation.
    let ids: Vec<Uuid> = sqlx::query_scalar(concat!(
        "with live as (
             select (convert_from(job, 'UTF8')::jsonb ->> 'generation_id')::uuid as generation_id
               from apalis.jobs
              where job_type = $1 and status <> 'Done' and ",
        crate::job_live!(),
        ")
         select g.generation_id from generations g
          where g.status in ('queued', 'running') and g.updated_at < $2
            and not exists (select 1 from live where live.generation_id = g.generation_id)
          order by g.updated_at
          limit 500",
    ))
    .bind(QUEUE)
    .bind(now - ABANDONED_AFTER)
    .fetch_all(pool)
    .await?;
    let mut n = 0;
    for id in ids {
        n += usize::from(end_unfinished(pool, id, Ending::JobLost).await?);
    }
    if n > 0 {
        tracing::warn!(
            generations = n,
            "generations whose job was gone failed (job_lost)"
        );
    }
    Ok(n)
}

/// Fold the generations finished before `now` less [`jobs::FOLD_MARGIN`]
/// (and before the database's own clock less it) into
/// `generations_finished_retired` by kind and status, and move the
/// watermark there; returns how many were folded. `/metrics` then reads only
/// the generations finished since (and the queued and running ones), so a
/// scrape stays cheap however many generations the table keeps. A purge
/// takes its folded generations off the totals
/// (`slate_events::projections::generations`).
pub async fn fold_counts(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, sqlx::Error> {
    Ok(fold_counts_by(pool, now, jobs::FOLD_STEP).await?.0)
}

/// [`fold_counts`] at most `step` generations a transaction; returns the
/// generations folded and the transactions it took.
pub async fn fold_counts_by(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
    step: i64,
) -> Result<(u64, u32), sqlx::Error> {
    let f = jobs::Fold {
        // A purge deletes generations, then takes the watermark; a rebuild
        // truncates them, then resets it: the same order here.
        first: Some("lock table generations in access share mode"),
        watermark: "generation_count_watermark",
        table: "generations",
        filter: "true",
        stamp: "finished_at",
        fold: "with a as (
                   select kind, status, count(*) as n from generations
                    where finished_at >= $1 and finished_at < $2
                    group by 1, 2),
                    totals as (
                   insert into generations_finished_retired (kind, status, generations)
                   select kind, status, n from a
                   on conflict (kind, status) do update
                      set generations = generations_finished_retired.generations + excluded.generations)
               select sum(n)::int8 from a",
    };
    jobs::fold_before_watermark(pool, now, &f, step).await
}
