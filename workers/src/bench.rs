//! Worker-side measurements for `slate bench`: bare apalis-postgres no-op
//! jobs per second, and end-to-end generations per second with an instant
//! provider (the local one making text), each job through the same worker
//! set-up as `slate work`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_postgres::Config;
use serde::{Deserialize, Serialize};
use slate_events::Metadata;
use slate_events::catalog::GrantSource;
use slate_events::generations::{Submission, Submitted};
use sqlx::PgPool;
use uuid::Uuid;

use crate::generations::{self, GenerationJob, GenerationWorker};
use crate::providers::{ProviderSettings, Providers};
use crate::runtime::split_concurrency;
use crate::storage::{Storage, StorageSettings};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop {
    i: usize,
}

async fn noop(_job: Noop) -> Result<(), BoxDynError> {
    Ok(())
}

fn config(queue: &str) -> Config {
    Config::default()
        .queue(queue)
        .batch_size(10)
        .heartbeat_interval(Duration::from_secs(5))
        .missed_heartbeats(3)
}

/// The database's clock (job completion times are taken from it).
async fn db_now(pool: &PgPool) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    Ok(sqlx::query_scalar("select clock_timestamp()")
        .fetch_one(pool)
        .await?)
}

/// Wait until `n` jobs of `queue` are done; jobs per second from `start`
/// (the database's clock) to the last completion. Polled every 100 ms: the
/// count scans the queue's rows, and polling it more often took a visible
/// share of PostgreSQL's CPU from the jobs being measured.
async fn wait_done(
    pool: &PgPool,
    queue: &str,
    n: usize,
    limit: Duration,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let deadline = Instant::now() + limit;
    loop {
        let (done, last): (i64, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
            "select count(*), max(done_at) from apalis.jobs where job_type = $1 and status = 'Done'",
        )
        .bind(queue)
        .fetch_one(pool)
        .await?;
        if let Some(last) = last.filter(|_| done >= n as i64) {
            return Ok(last);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{queue}: not done within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` per second from `from` to `to` (the database's clock).
fn per_second(
    n: f64,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> f64 {
    n / (to - from).as_seconds_f64().max(1e-3)
}

/// How the no-op worker takes its jobs.
#[derive(Debug, Clone, Copy)]
pub enum NoopSetup {
    /// apalis-postgres's usual set-up: 10 jobs per fetch, no concurrency
    /// limit (no queue of `slate work` runs this way since the fortieth
    /// session: the queue's own cost per job, nothing else).
    Bare,
    /// The generation queue's: `concurrency` at once across `fetchers`
    /// workers, each fetching as many as it has free slots, each job on its
    /// own task.
    Limited { concurrency: usize, fetchers: usize },
    /// As `Limited`, but nothing is queued beforehand: `clients` enqueue the
    /// jobs while the worker runs, one per transaction followed by its wake,
    /// as generations are submitted. The no-op counterpart of
    /// [`generations_per_second`], enqueueing included.
    Submitted {
        concurrency: usize,
        fetchers: usize,
        clients: usize,
    },
}

/// Jobs per second of a handler that does nothing.
pub async fn noop_jobs_per_second(
    pool: &PgPool,
    n: usize,
    setup: NoopSetup,
) -> anyhow::Result<f64> {
    let queue = match setup {
        NoopSetup::Bare => "bench.noop",
        NoopSetup::Limited { .. } => "bench.noop-limited",
        NoopSetup::Submitted { .. } => "bench.noop-submitted",
    };
    let queued_beforehand = if matches!(setup, NoopSetup::Submitted { .. }) {
        0
    } else {
        n
    };
    let mut conn = pool.acquire().await?;
    for chunk in (0..queued_beforehand).collect::<Vec<_>>().chunks(500) {
        let tasks = chunk
            .iter()
            .map(|i| {
                TaskBuilder::new(serde_json::to_vec(&Noop { i: *i }).expect("serializes")).build()
            })
            .collect();
        apalis_postgres::queries::push_tasks(&mut *conn, queue, tasks).await?;
    }
    drop(conn);
    let queue_pool = crate::poll::queue_pool(pool);
    let wakeups = crate::poll::Wakeups::start(pool.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let start = db_now(pool).await?;
    let monitor = match setup {
        NoopSetup::Bare => {
            let storage = crate::poll::backend::<Noop>(&wakeups, &queue_pool, queue, config(queue));
            Monitor::new().register(move |_| {
                WorkerBuilder::new(format!("bench-noop-{}", Uuid::new_v4().simple()))
                    .backend(storage.clone())
                    .build(noop)
            })
        }
        NoopSetup::Limited {
            concurrency,
            fetchers,
        }
        | NoopSetup::Submitted {
            concurrency,
            fetchers,
            ..
        } => {
            let storage = crate::poll::backend::<Noop>(&wakeups, &queue_pool, queue, config(queue));
            let slots = split_concurrency(concurrency, fetchers);
            Monitor::new().register_n(slots.len(), move |i, _| {
                WorkerBuilder::new(format!("bench-noop-{}", Uuid::new_v4().simple()))
                    .backend(crate::poll::limited(&storage, slots[i]))
                    .concurrency(slots[i])
                    .parallelize(tokio::spawn)
                    .build(noop)
            })
        }
    };
    let running = tokio::spawn(monitor.run_with_signal(async move {
        let _ = stopped.await;
        Ok(())
    }));
    if let NoopSetup::Submitted { clients, .. } = setup {
        submit_noops(pool, queue, n, clients).await?;
    }
    let last = wait_done(pool, queue, n, Duration::from_secs(600)).await?;
    let _ = stop.send(());
    let _ = running.await;
    queue_pool.close().await;
    Ok(per_second(n as f64, start, last))
}

/// Client `c`'s part of `n` jobs shared by `clients` clients.
fn share(n: usize, clients: usize, c: usize) -> usize {
    n / clients + usize::from(c < n % clients)
}

/// `n` no-op jobs enqueued by `clients` concurrent clients, one per
/// transaction, each followed by its wake.
async fn submit_noops(pool: &PgPool, queue: &str, n: usize, clients: usize) -> anyhow::Result<()> {
    let clients = clients.max(1);
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let (pool, queue) = (pool.clone(), queue.to_owned());
        let mine = share(n, clients, c);
        tasks.push(tokio::spawn(async move {
            for i in 0..mine {
                let mut tx = pool.begin().await?;
                let wake = crate::jobs::enqueue(&mut tx, &queue, &Noop { i }, 3).await?;
                tx.commit().await?;
                wake.send(&pool).await;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// [`generations_per_second`]'s figures.
#[derive(Debug, Clone)]
pub struct GenerationRates {
    /// Generations from the first submission to the last completion.
    pub end_to_end: f64,
    /// Submissions (reserve, record, enqueue: one transaction each) from the
    /// first to the last commit, while the worker ran.
    pub submitted: f64,
    /// Generations finished while the submissions went in, per second of
    /// that time.
    pub while_submitting: f64,
    /// Generations finished after the last submission, per second from it to
    /// the last completion: the worker with the machine to itself.
    pub after_submissions: f64,
    /// The bench accounts, whose outputs are left in the bucket until
    /// [`remove_outputs`] deletes them.
    pub accounts: Vec<Uuid>,
}

/// Generations per second end to end: reserved, queued, run by the worker
/// with the instant local provider, stored in S3, captured. `submitters`
/// clients submit concurrently, each for its own account (an account's
/// reservations and captures take turns on its row, by design: one account
/// alone is bounded by that, see docs/PERFORMANCE.md).
pub async fn generations_per_second(
    pool: &PgPool,
    storage: &StorageSettings,
    n: usize,
    concurrency: usize,
    fetchers: usize,
    submitters: usize,
) -> anyhow::Result<GenerationRates> {
    let accounts = funded_accounts(pool, submitters.max(1), n).await?;
    let submitters = accounts.len();
    let workers = GenerationWorkers::start(pool, storage, concurrency, fetchers).await?;
    let start = db_now(pool).await?;
    let mut clients = Vec::new();
    for (c, &account) in accounts.iter().enumerate() {
        let pool = pool.clone();
        let mine = share(n, submitters, c);
        clients.push(tokio::spawn(async move {
            for i in 0..mine {
                submit_script(&pool, account, &format!("bench idea {c}/{i}")).await?;
            }
            anyhow::Ok(())
        }));
    }
    for c in clients {
        c.await??;
    }
    let submissions_end = db_now(pool).await?;
    let last = wait_done(pool, generations::QUEUE, n, Duration::from_secs(600)).await?;
    // A job ends Done when its generation failed for good too (the failure
    // is recorded and refunded): only succeeded generations count.
    let (succeeded, other): (i64, i64) = sqlx::query_as(
        "select count(*) filter (where status = 'succeeded'),
                count(*) filter (where status <> 'succeeded')
           from generations where account_id = any($1)",
    )
    .bind(&accounts)
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(
        succeeded == n as i64 && other == 0,
        "{succeeded} of {n} generations succeeded ({other} did not): the figures would count failures"
    );
    let done_while_submitting: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs
          where job_type = $1 and status = 'Done' and done_at <= $2",
    )
    .bind(generations::QUEUE)
    .bind(submissions_end)
    .fetch_one(pool)
    .await?;
    workers.stop().await;
    let (n, while_submitting) = (n as f64, done_while_submitting as f64);
    Ok(GenerationRates {
        end_to_end: per_second(n, start, last),
        submitted: per_second(n, start, submissions_end),
        while_submitting: per_second(while_submitting, start, submissions_end),
        after_submissions: per_second(n - while_submitting, submissions_end, last),
        accounts,
    })
}

/// A new account for the bench (an address of its own each time).
pub async fn bench_account(conn: &mut sqlx::PgConnection) -> Result<Uuid, slate_events::Error> {
    slate_events::accounts::create_account(
        conn,
        &format!("bench-{}@example.com", Uuid::new_v4().simple()),
        false,
        Metadata::system(),
    )
    .await
}

/// `count` bench accounts, each with credits for `n` generations.
async fn funded_accounts(pool: &PgPool, count: usize, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut accounts = Vec::with_capacity(count);
    let mut conn = pool.acquire().await?;
    for _ in 0..count {
        let account = bench_account(&mut conn).await?;
        slate_events::credits::grant(
            &mut conn,
            &slate_events::credits::Grant {
                account_id: account,
                amount: n as i64 * 10,
                source: GrantSource::Promotion,
                grant_key: format!("bench:{account}"),
                stripe_object: None,
                expires_at: None,
                reason: Some("bench".into()),
            },
            &Metadata::system(),
        )
        .await?;
        accounts.push(account);
    }
    Ok(accounts)
}

/// Submit a script generation for `account` as the HTTP path does (one
/// transaction, then the wake); its id, and when its transaction committed.
async fn submit_script(
    pool: &PgPool,
    account: Uuid,
    idea: &str,
) -> anyhow::Result<(Uuid, Instant)> {
    let mut tx = pool.begin().await?;
    let s = Submission {
        generation_id: Uuid::now_v7(),
        account_id: account,
        kind: "script".into(),
        provider: "local".into(),
        tier: None,
        units: 1,
        collection_id: "bench".into(),
        prompt: Some(idea.to_owned()),
        input_key: None,
        parameters: serde_json::json!({}),
        deadline: None,
        webhook_url: None,
        hold_until: chrono::Utc::now() + chrono::Duration::hours(1),
    };
    // As the HTTP path: a refused reservation rolls back (the transaction
    // is dropped), and the bench stops at once rather than wait for a job
    // that was never queued.
    let (outcome, wake) = generations::submit(&mut tx, &s, &Metadata::system(), 3).await?;
    match outcome {
        Submitted::Accepted { .. } => {}
        Submitted::Insufficient { shortfall, .. } => {
            anyhow::bail!("a bench account ran out of credits (short by {shortfall})")
        }
        Submitted::AccountDeleted => anyhow::bail!("a bench account was deleted"),
    }
    tx.commit().await?;
    let committed = Instant::now();
    wake.send(pool).await;
    Ok((s.generation_id, committed))
}

/// The generation workers, set up as `slate work` runs them, with the
/// instant local provider.
struct GenerationWorkers {
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), MonitorError>>,
    queue_pool: PgPool,
}

impl GenerationWorkers {
    async fn start(
        pool: &PgPool,
        storage: &StorageSettings,
        concurrency: usize,
        fetchers: usize,
    ) -> anyhow::Result<Self> {
        let storage_client = Storage::new(storage);
        storage_client.ensure_bucket().await?;
        let worker = GenerationWorker {
            pool: pool.clone(),
            providers: Arc::new(Providers::new(&ProviderSettings::default())?),
            storage: storage_client,
            max_attempts: 3,
            poll_interval: Duration::from_millis(50),
            poll_timeout: Duration::from_secs(60),
            downloads: generations::Downloads::new(1 << 20, 64 << 20),
            http: generations::media_client()?,
            media_allow: Vec::new(),
        };
        let queue_pool = crate::poll::queue_pool(pool);
        let backend = crate::poll::backend::<GenerationJob>(
            &crate::poll::Wakeups::start(pool.clone()),
            &queue_pool,
            generations::QUEUE,
            config(generations::QUEUE),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let slots = split_concurrency(concurrency, fetchers);
        let monitor = Monitor::new().register_n(slots.len(), move |i, _| {
            WorkerBuilder::new(format!("bench-generations-{}", Uuid::new_v4().simple()))
                // As `slate work` runs it.
                .backend(crate::poll::limited(&backend, slots[i]))
                .data(worker.clone())
                .concurrency(slots[i])
                .parallelize(tokio::spawn)
                .build(generations::handle)
        });
        let running = tokio::spawn(monitor.run_with_signal(async move {
            let _ = stopped.await;
            Ok(())
        }));
        Ok(Self {
            stop,
            running,
            queue_pool,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.running.await;
        self.queue_pool.close().await;
    }
}

/// [`fair_wait`]'s figures.
#[derive(Debug, Clone)]
pub struct FairWait {
    /// Milliseconds from a light account's submission (its commit) to its
    /// generation's start, one at a time, behind the heavy account's
    /// backlog.
    pub light_ms: Vec<f64>,
    /// Seconds the workers took to start the whole backlog: about what the
    /// light account's generation would have waited, taken in order of
    /// arrival.
    pub backlog_drain_s: f64,
    pub accounts: Vec<Uuid>,
}

/// Accounts taking turns in the queue: a heavy account queues `backlog`
/// generations, the workers start and take the first of them, and a light
/// account then submits `samples` generations one at a time, each timed
/// from its commit to its start (the generation leaving `queued`, polled
/// every 2 ms).
pub async fn fair_wait(
    pool: &PgPool,
    storage: &StorageSettings,
    backlog: usize,
    samples: usize,
    concurrency: usize,
    fetchers: usize,
) -> anyhow::Result<FairWait> {
    let accounts = funded_accounts(pool, 2, backlog.max(samples)).await?;
    let (heavy, light) = (accounts[0], accounts[1]);
    // Part 4's jobs are in the queue's table too.
    let done_before: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs where job_type = $1 and status = 'Done'",
    )
    .bind(generations::QUEUE)
    .fetch_one(pool)
    .await?;
    let mut first = None;
    for i in 0..backlog.max(1) {
        let (id, _) = submit_script(pool, heavy, &format!("bench backlog {i}")).await?;
        first.get_or_insert(id);
    }
    let workers = GenerationWorkers::start(pool, storage, concurrency, fetchers).await?;
    let started = db_now(pool).await?;
    // Timed from the workers' first start, not their start-up.
    if let Some(first) = first {
        started_within(pool, first, Instant::now() + Duration::from_secs(60)).await?;
    }
    let mut light_ms = Vec::with_capacity(samples);
    for i in 0..samples {
        let (id, committed) = submit_script(pool, light, &format!("bench light {i}")).await?;
        started_within(pool, id, committed + Duration::from_secs(60)).await?;
        light_ms.push(committed.elapsed().as_secs_f64() * 1000.0);
    }
    wait_done(
        pool,
        generations::QUEUE,
        done_before as usize + backlog.max(1) + samples,
        Duration::from_secs(600),
    )
    .await?;
    let last_start: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "select max(j.lock_at) from apalis.jobs j
           join generations g
             on g.generation_id = (convert_from(j.job, 'UTF8')::jsonb ->> 'generation_id')::uuid
          where j.job_type = $1 and g.account_id = $2",
    )
    .bind(generations::QUEUE)
    .bind(heavy)
    .fetch_one(pool)
    .await?;
    workers.stop().await;
    Ok(FairWait {
        light_ms,
        backlog_drain_s: (last_start - started).as_seconds_f64().max(0.0),
        accounts,
    })
}

/// Wait until generation `id` has left `queued` (polled every 2 ms), at
/// most until `deadline`.
async fn started_within(pool: &PgPool, id: Uuid, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let status = generation_status(pool, id).await?;
        if status != "queued" {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "a generation was not started within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Part 9 for generations: milliseconds from a script generation's
/// submission (its commit, as the client saw it) to its start (the
/// `recorded_at` of its first `GenerationStarted`: the attempt's
/// transaction start, on the same clock), `samples` of them one at a time
/// on an idle queue (each submitted once the last one finished), through
/// the generation workers as `slate work` runs them. A start the clock puts
/// before the client saw its commit counts 0 (a fetch that was looking
/// anyway); how many did is returned too. Also the bench account.
pub async fn generation_pickup(
    pool: &PgPool,
    storage: &StorageSettings,
    samples: usize,
    concurrency: usize,
    fetchers: usize,
) -> anyhow::Result<(Vec<f64>, usize, Vec<Uuid>)> {
    let accounts = funded_accounts(pool, 1, samples.max(1)).await?;
    let workers = GenerationWorkers::start(pool, storage, concurrency, fetchers).await?;
    // Let the workers register and start listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut out = Vec::with_capacity(samples);
    let mut early = 0;
    for i in 0..samples {
        let (id, committed) =
            submit_script(pool, accounts[0], &format!("bench pickup {i}")).await?;
        let committed = chrono::Utc::now() - committed.elapsed();
        finished_within(pool, id, Instant::now() + Duration::from_secs(60)).await?;
        let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "select min(recorded_at) from events
              where stream_id = $1 and event_type = 'GenerationStarted'",
        )
        .bind(format!("generation-{id}"))
        .fetch_one(pool)
        .await?;
        let ms = (started - committed).as_seconds_f64() * 1000.0;
        early += usize::from(ms < 0.0);
        out.push(ms.max(0.0));
    }
    workers.stop().await;
    Ok((out, early, accounts))
}

async fn generation_status(pool: &PgPool, id: Uuid) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select status from generations where generation_id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
}

/// Wait until generation `id` has finished (polled every 5 ms), at most
/// until `deadline`; an error unless it succeeded.
async fn finished_within(pool: &PgPool, id: Uuid, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let status = generation_status(pool, id).await?;
        match status.as_str() {
            "succeeded" => return Ok(()),
            "queued" | "running" => {}
            other => anyhow::bail!("a bench generation ended {other}"),
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "a generation did not finish within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Delete what [`generations_per_second`] stored in the bucket (each
/// account's objects, the accounts side by side): the bench leaves no
/// objects behind, as it leaves no database. (s3s-fs 0.14 keeps two small
/// files of its own per object it ever stored, deleted or not.)
pub async fn remove_outputs(storage: &StorageSettings, accounts: &[Uuid]) -> anyhow::Result<usize> {
    let storage = Storage::new(storage);
    let storage = &storage;
    let removed = futures::future::try_join_all(accounts.iter().map(|&a| async move {
        storage
            .delete_prefix(&crate::storage::account_prefix(a))
            .await
    }))
    .await?;
    Ok(removed.into_iter().sum())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pickup {
    i: usize,
    measured: bool,
}

type Started = Arc<tokio::sync::mpsc::UnboundedSender<(usize, Instant)>>;

async fn picked_up(job: Pickup, started: Data<Started>) -> Result<(), BoxDynError> {
    if job.measured {
        let _ = started.send((job.i, Instant::now()));
    }
    Ok(())
}

/// Milliseconds from a job's commit to its handler starting, for `samples`
/// jobs pushed one at a time on an idle queue, then for `samples` jobs
/// pushed behind a backlog of `backlog` others.
pub async fn pickup_latency(
    pool: &PgPool,
    samples: usize,
    backlog: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    const QUEUE: &str = "bench.pickup";
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started: Started = Arc::new(tx);
    let queue_pool = crate::poll::queue_pool(pool);
    let storage = crate::poll::backend::<Pickup>(
        &crate::poll::Wakeups::start(pool.clone()),
        &queue_pool,
        QUEUE,
        config(QUEUE),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let monitor = Monitor::new().register(move |_| {
        WorkerBuilder::new(format!("bench-pickup-{}", Uuid::new_v4().simple()))
            .backend(storage.clone())
            .data(started.clone())
            .concurrency(8)
            .build(picked_up)
    });
    let running = tokio::spawn(monitor.run_with_signal(async move {
        let _ = stopped.await;
        Ok(())
    }));
    // Let the worker register and start listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let push = |i: usize, measured: bool| {
        TaskBuilder::new(serde_json::to_vec(&Pickup { i, measured }).expect("serializes")).build()
    };
    let mut idle = Vec::with_capacity(samples);
    for i in 0..samples {
        let mut tx = pool.begin().await?;
        apalis_postgres::queries::push_tasks(&mut *tx, QUEUE, vec![push(i, true)]).await?;
        tx.commit().await?;
        let committed = Instant::now();
        // As every enqueuer does (jobs::Wake): counted in the latency.
        crate::jobs::Wake::queue(QUEUE).send(pool).await;
        let (_, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the pickup worker stopped"))?;
        idle.push(at.saturating_duration_since(committed).as_secs_f64() * 1000.0);
    }
    let mut conn = pool.acquire().await?;
    for chunk in (0..backlog).collect::<Vec<_>>().chunks(500) {
        let tasks = chunk.iter().map(|i| push(*i, false)).collect();
        apalis_postgres::queries::push_tasks(&mut *conn, QUEUE, tasks).await?;
    }
    let mut committed_at = std::collections::HashMap::new();
    for i in 0..samples {
        apalis_postgres::queries::push_tasks(&mut *conn, QUEUE, vec![push(i, true)]).await?;
        committed_at.insert(i, Instant::now());
        crate::jobs::Wake::queue(QUEUE).send(pool).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(conn);
    let mut loaded = Vec::with_capacity(samples);
    while loaded.len() < samples {
        let (i, at) = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the pickup worker stopped"))?;
        if let Some(c) = committed_at.get(&i) {
            loaded.push(at.saturating_duration_since(*c).as_secs_f64() * 1000.0);
        }
    }
    let _ = stop.send(());
    let _ = running.await;
    queue_pool.close().await;
    Ok((idle, loaded))
}
