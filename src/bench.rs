//! `slate bench`: measured figures, never timed tests. Runs against the real
//! local services in a scratch database that it drops afterwards. Build with
//! `--release` for figures worth quoting.
//!
//! 1. raw ceiling: single-row INSERT transactions/s into a table shaped like
//!    `events`, at 1, 8 and 32 connections;
//! 2. event appends/s through the event store at the same concurrencies;
//! 3. verified Stripe webhook ingest over HTTP at N concurrent senders:
//!    req/s, p50, p99;
//! 4. bare apalis-postgres no-op jobs/s and end-to-end generations/s;
//!
//! and parts 5–9 (rebuild speed, append latency growth, RSS of `serve` and
//! `work`, staff audit queries at size, pickup latency) in `bench_scale`.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use slate_events::Metadata;
use slate_events::catalog::{AccountCreated, DomainEvent};
use slate_events::store::{self, ExpectedVersion, NewEvent};
use slate_workers::bench::NoopSetup;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};
use uuid::Uuid;

use crate::config::{Config, Secret};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Seconds per throughput measurement.
    pub seconds: f64,
    /// Webhook deliveries to send.
    pub webhooks: usize,
    pub senders: usize,
    /// Jobs for the queue measurements.
    pub jobs: usize,
    /// Workers sharing the generation queue's concurrency.
    pub generation_fetchers: usize,
    /// The generation queue's concurrency (`slate work`'s default: 8).
    pub generation_concurrency: usize,
    /// Clients submitting generations in part 4, each for its own account.
    pub generation_clients: usize,
    /// Writer tasks of the group commit in part 2b (the server's: 2).
    pub group_writers: usize,
    pub scale: crate::bench_scale::ScaleOptions,
}

impl BenchOptions {
    pub fn quick() -> Self {
        Self {
            seconds: 2.0,
            webhooks: 2_000,
            senders: 32,
            jobs: 300,
            generation_fetchers: slate_workers::runtime::GENERATION_FETCHERS,
            generation_concurrency: slate_workers::runtime::GENERATION_CONCURRENCY,
            generation_clients: GENERATION_CLIENTS,
            group_writers: slate_events::batch::BatchOptions::default().writers,
            scale: crate::bench_scale::ScaleOptions::quick(),
        }
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            seconds: 10.0,
            webhooks: 20_000,
            senders: 32,
            jobs: 3_000,
            generation_fetchers: slate_workers::runtime::GENERATION_FETCHERS,
            generation_concurrency: slate_workers::runtime::GENERATION_CONCURRENCY,
            generation_clients: GENERATION_CLIENTS,
            group_writers: slate_events::batch::BatchOptions::default().writers,
            scale: crate::bench_scale::ScaleOptions::default(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub connections: usize,
    pub per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    /// Single-row INSERT transactions/s at 32 connections (part 1's
    /// ceiling), measured in slices between the rounds of deliveries.
    pub ceiling_32: f64,
    pub senders: usize,
    pub requests: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: usize,
}

#[derive(Debug, Serialize)]
pub struct Jobs {
    pub jobs: usize,
    /// Clients submitting generations (one account each).
    pub submitters: usize,
    /// The generation worker's concurrency.
    pub concurrency: usize,
    /// Workers (fetch loops) sharing it.
    pub fetchers: usize,
    pub noop_per_second: f64,
    /// No-op jobs taken as the generation queue takes its jobs (as many per
    /// fetch as free slots, `concurrency` at once): the queue's own cost per
    /// job there.
    pub noop_limited_per_second: f64,
    /// No-op jobs enqueued while the worker runs, one per transaction by
    /// the generation clients, and taken the generation queue's way: a
    /// generation without its own work.
    pub noop_submitted_per_second: f64,
    pub generations_per_second: f64,
    /// How fast the clients' submissions went in during that run.
    pub submissions_per_second: f64,
    /// Generations finished per second while the submissions went in, and
    /// after the last of them (the worker alone).
    pub generations_while_submitting: f64,
    pub generations_after_submissions: f64,
    /// CPU per job by process, and the machine's busy cores, over each of
    /// the three runs (from the jobs' push or first submission to the last
    /// completion).
    pub cpu_per_noop: crate::bench_cpu::PerJob,
    pub cpu_per_noop_limited: crate::bench_cpu::PerJob,
    pub cpu_per_noop_submitted: crate::bench_cpu::PerJob,
    pub cpu_per_generation: crate::bench_cpu::PerJob,
    /// Part 4c: a light account's generations, submitted one at a time
    /// behind a heavy account's backlog of `jobs`, from commit to start
    /// (accounts take turns in the queue), and how long the workers took to
    /// start the whole backlog (about what they would have waited in order
    /// of arrival).
    pub fair_light_wait: crate::bench_scale::Percentiles,
    pub fair_backlog_drain_s: f64,
}

/// Parts 1, 2 and 2b.
#[derive(Debug, Serialize)]
pub struct Appends {
    pub insert_ceiling: Vec<Throughput>,
    pub event_appends: Vec<Throughput>,
    /// The same appends through [`store::GroupCommit`].
    pub group_commit_appends: Vec<Throughput>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub build: &'static str,
    /// The server's durability settings, which bound every commit figure.
    pub durability: String,
    #[serde(flatten)]
    pub appends: Appends,
    pub webhook_ingest: Latency,
    pub jobs: Jobs,
    pub rebuild: crate::bench_scale::Rebuild,
    pub append_growth: crate::bench_scale::AppendGrowth,
    pub skip: crate::bench_scale::Skip,
    pub export: crate::bench_scale::ExportPages,
    pub processes: Processes,
    pub audit_entries: crate::bench_scale::AuditFill,
    pub audit_queries: Vec<crate::bench_scale::AuditQuery>,
    pub pickup_idle: crate::bench_scale::Percentiles,
    pub pickup_loaded: crate::bench_scale::Percentiles,
    pub pickup_backlog: usize,
    /// Script generations submitted one at a time to an idle generation
    /// queue: commit to start.
    pub pickup_generation_idle: crate::bench_scale::Percentiles,
    /// How many of those the clock put before their commit (counted 0).
    pub pickup_generation_early: usize,
    pub scrape: crate::bench_scale::Scrape,
    pub purge: crate::bench_scale::PurgeLookup,
    pub auth: crate::bench_auth::AuthCost,
    pub peak_rss_mib: f64,
}

/// Resident memory of `slate serve` and `slate work` (child processes), MiB.
#[derive(Debug, Serialize)]
pub struct Processes {
    pub serve_idle_mib: f64,
    pub work_idle_mib: f64,
    pub serve_peak_mib: f64,
    pub work_peak_mib: f64,
    pub load: String,
}

const LEVELS: [usize; 3] = [1, 8, 32];
/// Interleaved slices per level in parts 1, 2 and 2b, and rounds of
/// deliveries (each after a slice of the ceiling at 32) in part 3.
const ROUNDS: usize = 5;
/// Concurrent clients submitting generations, each for its own account.
const GENERATION_CLIENTS: usize = 16;

pub async fn run(config: &Config, opts: &BenchOptions) -> anyhow::Result<Report> {
    in_scratch_database(config, |options, _| run_in(config, opts, options)).await
}

/// Part 5 alone (`slate bench --only rebuild`), in its own scratch database.
pub async fn run_rebuild(
    config: &Config,
    opts: &BenchOptions,
) -> anyhow::Result<crate::bench_scale::Rebuild> {
    in_scratch_database(config, |options, _| async move {
        let pool = scratch_pool(options, 4).await?;
        eprintln!("bench: rebuild over {} events", opts.scale.rebuild_events);
        let rebuild = crate::bench_scale::rebuild_speed(&pool, opts.scale.rebuild_events).await;
        pool.close().await;
        rebuild
    })
    .await
}

/// Part 8 alone (`slate bench --only audit`), in its own scratch database:
/// every audit entry is the fill's.
pub async fn run_audit(
    config: &Config,
    opts: &BenchOptions,
) -> anyhow::Result<(
    crate::bench_scale::AuditFill,
    Vec<crate::bench_scale::AuditQuery>,
)> {
    in_scratch_database(config, |options, _| async move {
        let pool = scratch_pool(options, 4).await?;
        eprintln!("bench: {} audit entries", opts.scale.audit_entries);
        let audit = async {
            let fill = crate::bench_scale::fill_audit(&pool, opts.scale.audit_entries).await?;
            let queries =
                crate::bench_scale::audit_queries(&pool, &fill, opts.scale.samples).await?;
            anyhow::Ok((fill, queries))
        }
        .await;
        pool.close().await;
        audit
    })
    .await
}

/// Part 10 alone (`slate bench --only scrape`), in its own scratch database.
pub async fn run_scrape(
    config: &Config,
    opts: &BenchOptions,
) -> anyhow::Result<crate::bench_scale::Scrape> {
    in_scratch_database(config, |options, _| async move {
        let pool = scratch_pool(options, 4).await?;
        eprintln!(
            "bench: /metrics over {} processed Stripe events, {} Done jobs and {} finished generations",
            opts.scale.stripe_events, opts.scale.finished_jobs, opts.scale.finished_generations
        );
        let scrape = crate::bench_scale::scrape(config, &pool, &opts.scale).await;
        pool.close().await;
        scrape
    })
    .await
}

/// Part 12: `--webhooks` requests from `--senders` clients, and
/// `--samples` authentications alone.
async fn auth_cost(
    config: &Config,
    pool: &PgPool,
    opts: &BenchOptions,
) -> anyhow::Result<crate::bench_auth::AuthCost> {
    crate::bench_auth::auth_cost(
        config,
        pool,
        opts.senders,
        opts.webhooks,
        opts.scale.samples,
        opts.scale.credit_buckets,
    )
    .await
}

/// Part 12 alone (`slate bench --only auth`), in its own scratch database.
pub async fn run_auth(
    config: &Config,
    opts: &BenchOptions,
) -> anyhow::Result<crate::bench_auth::AuthCost> {
    in_scratch_database(config, |options, _| async move {
        let pool = scratch_pool(options, 40).await?;
        let auth = auth_cost(config, &pool, opts).await;
        pool.close().await;
        auth
    })
    .await
}

/// Part 11 alone (`slate bench --only purge`), over a mirror of its own, in
/// its own scratch database.
pub async fn run_purge(
    config: &Config,
    opts: &BenchOptions,
) -> anyhow::Result<crate::bench_scale::PurgeLookup> {
    in_scratch_database(config, |options, _| async move {
        let pool = scratch_pool(options, 4).await?;
        eprintln!(
            "bench: a purge's look-up over {} mirrored Stripe events",
            opts.scale.stripe_events
        );
        let purge = async {
            crate::bench_scale::fill_stripe_mirror(&pool, opts.scale.stripe_events).await?;
            crate::bench_scale::purge_lookup(&pool, &opts.scale).await
        }
        .await;
        pool.close().await;
        purge
    })
    .await
}

/// A pool of `max` connections to the scratch database, migrated.
async fn scratch_pool(options: PgConnectOptions, max: u32) -> anyhow::Result<PgPool> {
    let pool = slate_events::db::pool_options()
        .max_connections(max)
        .connect_with(options.disable_statement_logging())
        .await?;
    crate::migrate::run(&pool).await?;
    Ok(pool)
}

/// The scratch table of the ceiling measurement, shaped like `events`: its
/// columns, defaults, constraints and all its indexes (`like events
/// including all`; the triggers, which refuse updates and deletes, are not
/// copied and an INSERT does not fire them).
async fn create_ceiling_table(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("create table bench_ceiling (like events including all)")
        .execute(pool)
        .await?;
    Ok(())
}

/// Part 1 at `c` connections: single-row INSERT transactions for
/// `duration` (`round` keeps the stream ids of repeated slices apart).
async fn ceiling(
    pool: &PgPool,
    c: usize,
    duration: Duration,
    round: usize,
) -> anyhow::Result<Count> {
    for_duration(pool, c, duration, move |pool, worker, i| async move {
        // The row an append of the same event writes: its id (time-ordered),
        // type, schema version, payload and metadata.
        let event = bench_event();
        sqlx::query(
            "insert into bench_ceiling
                 (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata)
             values ($1, $2, 1, $3, $4, $5, $6)",
        )
        .bind(event.event_id)
        .bind(format!("bench-{c}-r{round}-{worker}-{i}"))
        .bind(event.event.event_type())
        .bind(event.event.schema_version())
        .bind(event.event.payload())
        .bind(event.metadata.to_json())
        .execute(&pool)
        .await
        .map(|_| ())
    })
    .await
}

/// Part 3 alone, with the ceiling at 32 connections it is compared with
/// (`slate bench --only webhooks`).
pub async fn run_webhooks(config: &Config, opts: &BenchOptions) -> anyhow::Result<Latency> {
    in_scratch_database(config, |options, _| async move {
        let pool = scratch_pool(options, 40).await?;
        create_ceiling_table(&pool).await?;
        eprintln!("bench: webhook ingest and the INSERT ceiling at 32 connections");
        let webhook_ingest = webhooks(config, &pool, opts).await?;
        pool.close().await;
        Ok(webhook_ingest)
    })
    .await
}

/// Part 4 alone (`slate bench --only jobs`).
pub async fn run_jobs(config: &Config, opts: &BenchOptions) -> anyhow::Result<Jobs> {
    in_scratch_database(config, |options, _| async move {
        let pool = scratch_pool(options, 40).await?;
        eprintln!("bench: jobs");
        let jobs = jobs(config, &pool, opts).await?;
        pool.close().await;
        Ok(jobs)
    })
    .await
}

async fn jobs(config: &Config, pool: &PgPool, opts: &BenchOptions) -> anyhow::Result<Jobs> {
    let (concurrency, fetchers) = (opts.generation_concurrency, opts.generation_fetchers);
    let cpu = crate::bench_cpu::sample();
    let (noop_per_second, cpu, cpu_per_noop) =
        noop_run(pool, opts.jobs, NoopSetup::Bare, cpu).await?;
    let limited = NoopSetup::Limited {
        concurrency,
        fetchers,
    };
    let (noop_limited_per_second, cpu, cpu_per_noop_limited) =
        noop_run(pool, opts.jobs, limited, cpu).await?;
    let submitted = NoopSetup::Submitted {
        concurrency,
        fetchers,
        clients: opts.generation_clients,
    };
    let (noop_submitted_per_second, cpu, cpu_per_noop_submitted) =
        noop_run(pool, opts.jobs, submitted, cpu).await?;
    let storage = config.storage();
    let generations = slate_workers::bench::generations_per_second(
        pool,
        &storage,
        opts.jobs,
        opts.generation_concurrency,
        opts.generation_fetchers,
        opts.generation_clients,
    )
    .await?;
    let (_, cpu_per_generation) = per_job(cpu, opts.jobs);
    slate_workers::bench::remove_outputs(&storage, &generations.accounts).await?;
    let fair = slate_workers::bench::fair_wait(
        pool,
        &storage,
        opts.jobs,
        FAIR_SAMPLES,
        opts.generation_concurrency,
        opts.generation_fetchers,
    )
    .await?;
    slate_workers::bench::remove_outputs(&storage, &fair.accounts).await?;
    Ok(Jobs {
        jobs: opts.jobs,
        submitters: opts.generation_clients,
        concurrency: opts.generation_concurrency,
        fetchers: opts.generation_fetchers,
        noop_per_second,
        noop_limited_per_second,
        noop_submitted_per_second,
        generations_per_second: generations.end_to_end,
        submissions_per_second: generations.submitted,
        generations_while_submitting: generations.while_submitting,
        generations_after_submissions: generations.after_submissions,
        cpu_per_noop,
        cpu_per_noop_limited,
        cpu_per_noop_submitted,
        cpu_per_generation,
        fair_light_wait: crate::bench_scale::percentiles(fair.light_ms),
        fair_backlog_drain_s: fair.backlog_drain_s,
    })
}

/// Part 4c's light generations, timed one at a time.
const FAIR_SAMPLES: usize = 20;

/// One no-op run: its jobs per second, a CPU sample to go on from, and its
/// CPU per job since `since`.
async fn noop_run(
    pool: &PgPool,
    jobs: usize,
    setup: NoopSetup,
    since: crate::bench_cpu::Sample,
) -> anyhow::Result<(f64, crate::bench_cpu::Sample, crate::bench_cpu::PerJob)> {
    let rate = slate_workers::bench::noop_jobs_per_second(pool, jobs, setup).await?;
    let (now, cpu) = per_job(since, jobs);
    Ok((rate, now, cpu))
}

/// CPU per job of `jobs` jobs since `since`, and a new sample to go on from.
fn per_job(
    since: crate::bench_cpu::Sample,
    jobs: usize,
) -> (crate::bench_cpu::Sample, crate::bench_cpu::PerJob) {
    let now = crate::bench_cpu::sample();
    (now, now.per_job_since(&since, jobs))
}

/// The scratch databases created and not dropped yet (nested runs included).
static SCRATCH: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Run `body` against a scratch database (its options and URL), then drop it.
/// Interrupted (Ctrl-C, SIGTERM), it stops `body` (dropping it kills the
/// child processes it started) and drops every scratch database still
/// there, a nested run's too: they were left behind.
async fn in_scratch_database<T, F, Fut>(config: &Config, body: F) -> anyhow::Result<T>
where
    F: FnOnce(PgConnectOptions, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let base: PgConnectOptions = config.database_url.expose().parse()?;
    let db = format!("slate_bench_{}", Uuid::new_v4().simple());
    let admin = || async {
        base.clone()
            .database("postgres")
            .disable_statement_logging()
            .connect()
            .await
            .context("connecting to PostgreSQL")
    };
    let mut conn = admin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
        .execute(&mut conn)
        .await?;
    conn.close().await.ok();
    let mut url = reqwest::Url::parse(config.database_url.expose())?;
    url.set_path(&format!("/{db}"));
    SCRATCH.lock().expect("not poisoned").push(db.clone());
    let (result, names) = tokio::select! {
        r = body(base.clone().database(&db), url.as_str().to_owned()) => (r, vec![db.clone()]),
        () = crate::shutdown_signal() => (
            Err(anyhow::anyhow!("interrupted")),
            SCRATCH.lock().expect("not poisoned").clone(),
        ),
    };
    // A connection of its own: one opened before a run of half an hour may
    // be gone, and the run's result must not be lost to it.
    let dropped = async {
        let mut conn = admin().await?;
        for name in &names {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "drop database if exists {name} with (force)"
            )))
            .execute(&mut conn)
            .await?;
        }
        conn.close().await.ok();
        anyhow::Ok(())
    }
    .await
    .with_context(|| format!("dropping the scratch database {db}"));
    SCRATCH
        .lock()
        .expect("not poisoned")
        .retain(|n| !names.contains(n));
    match (result, dropped) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(v), Err(d)) => {
            eprintln!("bench: {d:#}: drop it by hand");
            Ok(v)
        }
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(d)) => {
            eprintln!("bench: {d:#}");
            Err(e)
        }
    }
}

async fn run_in(
    config: &Config,
    opts: &BenchOptions,
    options: PgConnectOptions,
) -> anyhow::Result<Report> {
    use crate::bench_scale as scale;
    let pool = scratch_pool(options, 40).await?;
    create_ceiling_table(&pool).await?;
    let durability: String = sqlx::query_scalar(
        "select string_agg(name || ' = ' || current_setting(name), ', ' order by name) from pg_settings
          where name in ('fsync', 'synchronous_commit', 'wal_sync_method', 'full_page_writes',
                         'commit_delay', 'shared_buffers')",
    )
    .fetch_one(&pool)
    .await?;
    eprintln!("bench: append latency on a small log");
    let small_log_events = scale::log_size(&pool).await?;
    let small = scale::append_latency(&pool, opts.scale.samples).await?;

    eprintln!("bench: INSERT ceiling and appends");
    let appends = appends(&pool, opts).await?;

    eprintln!("bench: webhook ingest");
    let webhook_ingest = webhooks(config, &pool, opts).await?;
    // Part 3's deliveries were ingested, never processed (no worker runs
    // here): left, they would wait for ever, and a purge's look-up (part 11)
    // reads the body of every event still waiting (it read 20,000 of them
    // in each sample, 545 ms where 6 ms is the figure without them). A
    // production mirror has such a backlog only while its workers are down.
    sqlx::query("delete from apalis.jobs where job_type = $1")
        .bind(slate_workers::stripe::QUEUE)
        .execute(&pool)
        .await?;
    sqlx::query("delete from stripe_events where status = 'pending'")
        .execute(&pool)
        .await?;
    eprintln!("bench: jobs");
    let jobs = jobs(config, &pool, opts).await?;
    eprintln!("bench: serve and work as child processes, idle and under load");
    // In a database of their own: this one holds the Stripe events part 3
    // queued and nobody processed, which `work` would start on, so its
    // "idle" figure would be taken while it worked through them.
    let processes = in_scratch_database(config, |options, url| async move {
        scratch_pool(options, 1).await?.close().await;
        processes(&url, opts).await
    })
    .await?;
    eprintln!(
        "bench: rebuild over {} more events",
        opts.scale.rebuild_events
    );
    let rebuild = scale::rebuild_speed(&pool, opts.scale.rebuild_events).await?;
    let have = scale::log_size(&pool).await?;
    let more = (opts.scale.log_events as i64 - have).max(0) as usize;
    eprintln!("bench: filling the log to {} events", opts.scale.log_events);
    scale::fill_log(&pool, more, "bench-log").await?;
    scale::settle(&pool).await?;
    let big_log_events = scale::log_size(&pool).await?;
    let big = scale::append_latency(&pool, opts.scale.samples).await?;
    eprintln!("bench: an idle projector's checkpoint over the log");
    let skip = scale::skip_speed(&pool).await?;
    eprintln!("bench: accounts' exports from the log");
    let export = scale::export_pages(&pool, opts.scale.samples).await?;
    eprintln!("bench: {} audit entries", opts.scale.audit_entries);
    let audit_entries = scale::fill_audit(&pool, opts.scale.audit_entries).await?;
    let audit_queries = scale::audit_queries(&pool, &audit_entries, opts.scale.samples).await?;
    eprintln!("bench: pickup latency");
    let (idle, loaded) =
        slate_workers::bench::pickup_latency(&pool, opts.scale.pickup_samples, opts.jobs).await?;
    let storage = config.storage();
    let (generation_idle, generation_early, accounts) = slate_workers::bench::generation_pickup(
        &pool,
        &storage,
        opts.scale.pickup_samples,
        opts.generation_concurrency,
        opts.generation_fetchers,
    )
    .await?;
    slate_workers::bench::remove_outputs(&storage, &accounts).await?;
    eprintln!(
        "bench: /metrics over {} processed Stripe events, {} Done jobs and {} finished generations",
        opts.scale.stripe_events, opts.scale.finished_jobs, opts.scale.finished_generations
    );
    let scrape = scale::scrape(config, &pool, &opts.scale).await?;
    eprintln!(
        "bench: a purge's look-up of its Stripe events, before and after their ids are written"
    );
    let purge = scale::purge_lookup(&pool, &opts.scale).await?;
    eprintln!("bench: what authenticating a request costs");
    let auth = auth_cost(config, &pool, opts).await?;
    pool.close().await;
    Ok(Report {
        rebuild,
        append_growth: scale::AppendGrowth {
            small_log_events,
            small,
            big_log_events,
            big,
        },
        skip,
        export,
        processes,
        audit_entries,
        audit_queries,
        pickup_idle: scale::percentiles(idle),
        pickup_loaded: scale::percentiles(loaded),
        pickup_backlog: opts.jobs,
        pickup_generation_idle: scale::percentiles(generation_idle),
        pickup_generation_early: generation_early,
        scrape,
        purge,
        auth,
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        durability,
        appends,
        webhook_ingest,
        jobs,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Parts 1, 2 and 2b: the ceiling, and appends one per transaction and
/// through the group commit, at each of [`LEVELS`]. Each level's three
/// figures are taken in [`ROUNDS`] interleaved slices (ceiling, appends,
/// group commit, again), so that a ratio compares the same minutes of a
/// machine whose speed drifts (noisy neighbours, the WAL flush).
async fn appends(pool: &PgPool, opts: &BenchOptions) -> anyhow::Result<Appends> {
    let slice = Duration::from_secs_f64(opts.seconds / ROUNDS as f64);
    let mut insert_ceiling = Vec::new();
    let mut event_appends = Vec::new();
    let mut group_commit_appends = Vec::new();
    let group = store::GroupCommit::start(
        pool.clone(),
        slate_events::batch::BatchOptions {
            writers: opts.group_writers,
            ..Default::default()
        },
    );
    for &c in &LEVELS {
        let mut counts = [Count::default(); 3];
        for round in 0..ROUNDS {
            counts[0].add(ceiling(pool, c, slice, round).await?);
            counts[1].add(
                for_duration(pool, c, slice, move |pool, worker, i| async move {
                    let mut conn = pool.acquire().await?;
                    store::append(
                        &mut conn,
                        &format!("bench-{c}-r{round}-{worker}-{i}"),
                        ExpectedVersion::NoStream,
                        &[bench_event()],
                    )
                    .await
                    .map(|_| ())
                    .map_err(as_sqlx)
                })
                .await?,
            );
            let group = group.clone();
            counts[2].add(
                for_duration(pool, c, slice, move |_, worker, i| {
                    let group = group.clone();
                    async move {
                        group
                            .append(
                                &format!("bench-g{c}-r{round}-{worker}-{i}"),
                                ExpectedVersion::NoStream,
                                vec![bench_event()],
                            )
                            .await
                            .map(|_| ())
                            .map_err(as_sqlx)
                    }
                })
                .await?,
            );
        }
        let at = |n: Count| Throughput {
            connections: c,
            per_second: n.per_second(),
        };
        insert_ceiling.push(at(counts[0]));
        event_appends.push(at(counts[1]));
        group_commit_appends.push(at(counts[2]));
    }
    drop(group);
    Ok(Appends {
        insert_ceiling,
        event_appends,
        group_commit_appends,
    })
}

/// Parts 1, 2 and 2b alone (`slate bench --only appends`).
pub async fn run_appends(config: &Config, opts: &BenchOptions) -> anyhow::Result<Appends> {
    in_scratch_database(config, |options, _| async move {
        let pool = scratch_pool(options, 40).await?;
        create_ceiling_table(&pool).await?;
        eprintln!("bench: INSERT ceiling and appends");
        let appends = appends(&pool, opts).await?;
        pool.close().await;
        Ok(appends)
    })
    .await
}

/// A store error as the measurement loop's error type.
fn as_sqlx(e: slate_events::Error) -> sqlx::Error {
    match e {
        slate_events::Error::Database(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// The event every append measurement writes (a new stream each time),
/// naming one of 10,000 accounts at random, as users' events do: the log's
/// index by the account an event names (`events_account_idx`) then takes
/// its entries on pages all over it, as in production.
fn bench_event() -> NewEvent {
    NewEvent::new(
        DomainEvent::AccountCreated(AccountCreated {
            account_id: Uuid::from_u128(Uuid::new_v4().as_u128() % 10_000),
            email: "bench@example.com".into(),
            staff: false,
        }),
        Metadata::system(),
    )
}

/// Operations done and the seconds they took.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    ops: usize,
    secs: f64,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.ops += other.ops;
        self.secs += other.secs;
    }

    fn per_second(self) -> f64 {
        self.ops as f64 / self.secs
    }
}

/// Run `op` on `workers` concurrent tasks for `duration`.
async fn for_duration<F, Fut>(
    pool: &PgPool,
    workers: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<Count>
where
    F: Fn(PgPool, usize, usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let pool = pool.clone();
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while start.elapsed() < duration {
                op(pool.clone(), w, i).await?;
                i += 1;
            }
            Ok::<usize, sqlx::Error>(i)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(Count {
        ops: total,
        secs: start.elapsed().as_secs_f64(),
    })
}

const WEBHOOK_SECRET: &str = "whsec_bench_secret";
const EVENT_TEMPLATE: &str =
    include_str!("../tests/fixtures/stripe/01_checkout_session_completed_pack.json");

/// Part 3: verified deliveries over HTTP to an in-process server, in
/// [`ROUNDS`] rounds with a slice of the ceiling at 32 connections before
/// each, so that the ratio compares the same minutes.
async fn webhooks(config: &Config, pool: &PgPool, opts: &BenchOptions) -> anyhow::Result<Latency> {
    let mut config = config.clone();
    config.stripe_webhook_secrets = vec![Secret::new(WEBHOOK_SECRET)];
    config.livemode = false;
    let slice = Duration::from_secs_f64(opts.seconds / ROUNDS as f64);
    let per_round = opts.webhooks.div_ceil(ROUNDS);
    serving(config, pool, |base| async move {
        let url = format!("{base}/webhooks/stripe");
        let mut ceiling_32 = Count::default();
        let mut deliveries = Deliveries::default();
        for round in 0..ROUNDS {
            // Rounds after part 1's, whose stream ids are in the same table.
            ceiling_32.add(ceiling(pool, 32, slice, ROUNDS + round).await?);
            let tag = format!("w{round}");
            // Ingested only (no worker runs): any account will do.
            deliveries
                .add(send_webhooks(&url, opts.senders, per_round, &tag, &[Uuid::nil()]).await?);
        }
        anyhow::Ok(deliveries.latency(opts.senders, ceiling_32.per_second()))
    })
    .await
}

/// Run `body` with a server of this build on `pool` (its base URL, on port
/// 0 of 127.0.0.1), then stop the server.
pub(crate) async fn serving<T, F, Fut>(config: Config, pool: &PgPool, body: F) -> anyhow::Result<T>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let state = crate::http::AppState::new(config, pool.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::serve(listener, state, async move {
        let _ = stop_rx.await;
    }));
    let measured = body(base).await;
    let _ = stop_tx.send(());
    let _ = server.await;
    measured
}

/// Latencies (ms), failed requests and the seconds the deliveries took.
#[derive(Default)]
struct Deliveries {
    latencies_ms: Vec<f64>,
    errors: usize,
    secs: f64,
}

impl Deliveries {
    fn add(&mut self, other: Deliveries) {
        self.latencies_ms.extend(other.latencies_ms);
        self.errors += other.errors;
        self.secs += other.secs;
    }

    fn latency(mut self, senders: usize, ceiling_32: f64) -> Latency {
        let all = &mut self.latencies_ms;
        all.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| {
            all.get(((all.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        Latency {
            ceiling_32,
            senders,
            requests: all.len(),
            per_second: all.len() as f64 / self.secs,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            max_ms: pct(1.0),
            errors: self.errors,
        }
    }
}

/// `n` verified deliveries from `senders` concurrent clients, each a pack
/// bought by one of `accounts` (sender `s` buys for `accounts[s % len]`).
/// `tag` makes their Stripe ids unique in the database
/// (`evt_<tag>s<sender>x<i>_01`).
async fn send_webhooks(
    url: &str,
    senders: usize,
    n: usize,
    tag: &str,
    accounts: &[Uuid],
) -> anyhow::Result<Deliveries> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(senders)
        .build()?;
    let per_sender = n.div_ceil(senders);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..senders {
        let client = client.clone();
        let url = url.to_owned();
        let tag = tag.to_owned();
        let account = accounts[s % accounts.len().max(1)];
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_sender);
            let mut errors = 0usize;
            for i in 0..per_sender {
                let body = EVENT_TEMPLATE
                    .replace("{{ACCOUNT_ID}}", &account.to_string())
                    .replace("{{RUN}}", &format!("{tag}s{s}x{i}"));
                let header = crate::stripe::signature::sign(
                    WEBHOOK_SECRET,
                    chrono::Utc::now().timestamp(),
                    body.as_bytes(),
                );
                let t = Instant::now();
                // The answer is read whole, as a client does (an unread
                // body can cost the connection), and only answered
                // deliveries are timed: a fast refusal is no ingest.
                let ok = match client
                    .post(&url)
                    .header("stripe-signature", header)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut out = Deliveries::default();
    for t in tasks {
        let (l, e) = t.await?;
        out.latencies_ms.extend(l);
        out.errors += e;
    }
    out.secs = start.elapsed().as_secs_f64();
    // A refused or failed delivery is no ingest: the figures would count it.
    anyhow::ensure!(out.errors == 0, "{} webhook deliveries failed", out.errors);
    Ok(out)
}

/// Start `slate serve` and `slate work` on `database_url` (migrated, nothing
/// queued), read their memory idle, drive webhook deliveries through them,
/// read their peaks.
async fn processes(database_url: &str, opts: &BenchOptions) -> anyhow::Result<Processes> {
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let spawn = |cmd: &str| {
        Command::new(&exe)
            .arg(cmd)
            .env("DATABASE_URL", database_url)
            .env("SLATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("STRIPE_WEBHOOK_SECRETS", WEBHOOK_SECRET)
            // The deliveries are test mode, whatever this shell's setting.
            .env("SLATE_LIVEMODE", "false")
            // `work` as deployed by default, whatever this shell's settings:
            // part 7's peak memory follows how many run at once.
            .env_remove("SLATE_STRIPE_CONCURRENCY")
            .env_remove("SLATE_WEBHOOK_CONCURRENCY")
            .env_remove("SLATE_EMAIL_CONCURRENCY")
            .env_remove("SLATE_PURGE_CONCURRENCY")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
    };
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut serve = Kill(spawn("serve")?);
    let mut work = Kill(spawn("work")?);
    let base = format!("http://127.0.0.1:{port}");
    crate::bench_scale::wait_for_http(&format!("{base}/healthz"), Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (serve_idle_mib, _) = crate::bench_scale::rss_mib(serve.0.id());
    let (work_idle_mib, _) = crate::bench_scale::rss_mib(work.0.id());
    let n = opts.webhooks / 2;
    // The packs are bought by accounts that exist (one per sender), so the
    // worker processes them as a shop's deliveries are processed: each
    // links its customer and grants its pack. (Until the thirty-ninth
    // session the account did not exist and every event failed for good at
    // once: the worker's load was a failure path.)
    let pool = slate_events::db::pool_options()
        .max_connections(1)
        .connect(database_url)
        .await?;
    let mut accounts = Vec::with_capacity(opts.senders);
    let mut conn = pool.acquire().await?;
    for _ in 0..opts.senders {
        accounts.push(slate_workers::bench::bench_account(&mut conn).await?);
    }
    drop(conn);
    send_webhooks(
        &format!("{base}/webhooks/stripe"),
        opts.senders,
        n,
        "p",
        &accounts,
    )
    .await?;
    // Let the worker drain what the deliveries queued: no event pending or
    // failed (a failed one waits for its retry); then every one must be
    // processed (not ignored).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending: i64 = sqlx::query_scalar(
            "select count(*) from stripe_events where status in ('pending', 'failed')",
        )
        .fetch_one(&pool)
        .await?;
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the worker left {pending} Stripe events pending or failed after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let outcomes: Vec<(String, i64)> =
        sqlx::query_as("select status, count(*) from stripe_events group by 1 order by 1")
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    anyhow::ensure!(
        outcomes.iter().all(|(status, _)| status == "processed"),
        "part 7's deliveries were not all processed: {outcomes:?}"
    );
    let (_, serve_peak_mib) = crate::bench_scale::rss_mib(serve.0.id());
    let (_, work_peak_mib) = crate::bench_scale::rss_mib(work.0.id());
    // A process that died reads as 0 MiB, which would pass any target.
    for (name, child) in [("serve", &mut serve), ("work", &mut work)] {
        anyhow::ensure!(
            child.0.try_wait()?.is_none(),
            "slate {name} exited during the measurement"
        );
    }
    anyhow::ensure!(
        [serve_idle_mib, work_idle_mib, serve_peak_mib, work_peak_mib]
            .iter()
            .all(|m| *m > 0.0),
        "a process's RSS could not be read"
    );
    Ok(Processes {
        serve_idle_mib,
        work_idle_mib,
        serve_peak_mib,
        work_peak_mib,
        load: format!(
            "{n} webhook deliveries from {} senders, processed by the worker",
            opts.senders
        ),
    })
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn print_rebuild(r: &crate::bench_scale::Rebuild) {
    println!(
        "5. rebuild of {} over {} events: {:.1} s, {:.0} events/s",
        r.projection, r.events, r.seconds, r.per_second
    );
    println!("{}", serde_json::to_string(r).unwrap_or_default());
}

fn print_webhook_row(w: &Latency) {
    println!(
        "3. webhook ingest, {} senders, {} requests: {:.0} req/s (ratio to the ceiling at 32 measured alongside, {:.0}/s: {:.2}), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors",
        w.senders,
        w.requests,
        w.per_second,
        w.ceiling_32,
        w.per_second / w.ceiling_32,
        w.p50_ms,
        w.p99_ms,
        w.max_ms,
        w.errors
    );
}

fn print_jobs_row(j: &Jobs) {
    println!(
        "4. {} jobs: bare apalis no-op {:.0} jobs/s (taken as the generation queue takes them, as many per fetch as free slots, {} at once across {} workers: {:.0} jobs/s); end-to-end generations ({} clients with an account each, worker concurrency {} across {} workers, instant local provider, S3 upload, capture) {:.0}/s (ratio {:.2}; {:.2} of the no-op taken the same way; submissions went in at {:.0}/s; generations finished at {:.0}/s while they did, {:.0}/s after)",
        j.jobs,
        j.noop_per_second,
        j.concurrency,
        j.fetchers,
        j.noop_limited_per_second,
        j.submitters,
        j.concurrency,
        j.fetchers,
        j.generations_per_second,
        j.generations_per_second / j.noop_per_second,
        j.generations_per_second / j.noop_limited_per_second,
        j.submissions_per_second,
        j.generations_while_submitting,
        j.generations_after_submissions
    );
    println!(
        "   no-op jobs enqueued one per transaction by {} clients while the worker runs, taken the generation queue's way: {:.0} jobs/s (generations {:.2} of it)",
        j.submitters,
        j.noop_submitted_per_second,
        j.generations_per_second / j.noop_submitted_per_second
    );
    println!(
        "4c. accounts take turns: behind one account's backlog of {} generations (started in {:.1} s), another account's {} generations, one at a time, waited p50 {:.1} ms, p99 {:.1} ms from commit to start",
        j.jobs,
        j.fair_backlog_drain_s,
        j.fair_light_wait.samples,
        j.fair_light_wait.p50_ms,
        j.fair_light_wait.p99_ms
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = |name: &str, c: &crate::bench_cpu::PerJob| {
        println!(
            "   CPU per {name}: {:.2} ms (PostgreSQL {:.2}, bench process {:.2}, S3 server {:.2}); machine {:.2} of {cores} cores busy, {:.2} waiting for I/O, {:.2} stolen",
            c.total_ms,
            c.postgres_ms,
            c.bench_ms,
            c.s3_server_ms,
            c.machine_busy_cores,
            c.machine_iowait_cores,
            c.machine_steal_cores
        )
    };
    cpu("bare no-op job", &j.cpu_per_noop);
    cpu(
        "no-op job taken the generation queue's way",
        &j.cpu_per_noop_limited,
    );
    cpu(
        "no-op job submitted one per transaction, taken that way",
        &j.cpu_per_noop_submitted,
    );
    cpu("generation, end to end", &j.cpu_per_generation);
}

fn print_appends_rows(a: &Appends) {
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "", "1 conn", "8 conns", "32 conns"
    );
    let row = |name: &str, v: &[Throughput]| {
        println!(
            "{:<44} {:>12.0} {:>12.0} {:>12.0}",
            name, v[0].per_second, v[1].per_second, v[2].per_second
        );
    };
    let ratios = |v: &[Throughput]| {
        let ratio: Vec<String> = v
            .iter()
            .zip(&a.insert_ceiling)
            .map(|(a, c)| format!("{:.2}", a.per_second / c.per_second))
            .collect();
        println!(
            "{:<44} {:>12} {:>12} {:>12}",
            "   ratio to the ceiling", ratio[0], ratio[1], ratio[2]
        );
    };
    row("1. raw INSERT transactions/s (ceiling)", &a.insert_ceiling);
    row("2. event appends/s", &a.event_appends);
    ratios(&a.event_appends);
    row("2b. event appends/s, group commit", &a.group_commit_appends);
    ratios(&a.group_commit_appends);
}

pub fn print_appends(a: &Appends) {
    print_appends_rows(a);
    println!("{}", serde_json::to_string(a).unwrap_or_default());
}

pub fn print_webhooks(w: &Latency) {
    print_webhook_row(w);
    println!("{}", serde_json::to_string(w).unwrap_or_default());
}

pub fn print_jobs(j: &Jobs) {
    print_jobs_row(j);
    println!("{}", serde_json::to_string(j).unwrap_or_default());
}

pub fn print_scrape(s: &crate::bench_scale::Scrape) {
    println!(
        "10. /metrics with {} processed Stripe events, {} Done jobs and {} generations, p50 / p99 ms: {:.1} / {:.1} before the folds, {:.1} / {:.1} after them (the folds: {:.0} ms Stripe lag, {:.0} ms job durations, {:.0} ms generation counts)",
        s.stripe_events,
        s.finished_jobs,
        s.generations,
        s.unfolded.p50_ms,
        s.unfolded.p99_ms,
        s.folded.p50_ms,
        s.folded.p99_ms,
        s.fold_ms,
        s.job_fold_ms,
        s.generation_fold_ms
    );
}

pub fn print_purge(p: &crate::bench_scale::PurgeLookup) {
    println!(
        "11. a purge's look-up of its Stripe events ({} to {} found and redacted) in a mirror of {}: p50 / p99 ms {:.1} / {:.1} before their ids are written (every body scanned), {:.1} / {:.1} after (the sweep wrote them in {:.0} s, {:.0} events/s; their index {:.0} MiB)",
        p.events_per_account.0,
        p.events_per_account.1,
        p.stripe_events,
        p.unmapped.p50_ms,
        p.unmapped.p99_ms,
        p.mapped.p50_ms,
        p.mapped.p99_ms,
        p.map_seconds,
        p.mapped_per_second,
        p.refs_index_mib
    );
}

pub fn print(report: &Report) {
    println!("slate bench ({} build)", report.build);
    println!("PostgreSQL: {}", report.durability);
    print_appends_rows(&report.appends);
    print_webhook_row(&report.webhook_ingest);
    print_jobs_row(&report.jobs);
    let r = &report.rebuild;
    println!(
        "5. rebuild of {} over {} events: {:.1} s, {:.0} events/s",
        r.projection, r.events, r.seconds, r.per_second
    );
    let g = &report.append_growth;
    println!(
        "6. append latency: p50 {:.2} ms, p99 {:.2} ms at {} events; p50 {:.2} ms, p99 {:.2} ms at {} events (p99 ratio {:.2})",
        g.small.p50_ms,
        g.small.p99_ms,
        g.small_log_events,
        g.big.p50_ms,
        g.big.p99_ms,
        g.big_log_events,
        g.big.p99_ms / g.small.p99_ms.max(f64::EPSILON)
    );
    let k = &report.skip;
    println!(
        "6b. {} checkpoint over other events: {} passed in {:.2} s ({:.0} events/s)",
        k.projection, k.events_passed, k.seconds, k.per_second,
    );
    for (when, e) in [("before", &k.before), ("after", &k.after)] {
        println!(
            "    {when} the skip, p50 of {}: an empty batch {:.2} ms (its read alone {:.2}), {:.0} WAL bytes each; an empty poll (look first) {:.2} ms, {:.0} WAL bytes each",
            e.batch.samples,
            e.batch.p50_ms,
            e.read.p50_ms,
            e.batch_wal_bytes,
            e.poll.p50_ms,
            e.poll_wal_bytes
        );
    }
    let x = &report.export;
    println!(
        "6c. an account's events for its export at {} events ({} accounts, {:.0} events each): first page p50 {:.2} ms, p99 {:.2} ms; all pages p50 {:.2} ms, p99 {:.2} ms",
        x.log_events,
        x.accounts,
        x.events_per_account,
        x.first_page.p50_ms,
        x.first_page.p99_ms,
        x.all_pages.p50_ms,
        x.all_pages.p99_ms
    );
    let p = &report.processes;
    println!(
        "7. RSS: serve {:.0} MiB idle, {:.0} MiB peak; work {:.0} MiB idle, {:.0} MiB peak ({})",
        p.serve_idle_mib, p.serve_peak_mib, p.work_idle_mib, p.work_peak_mib, p.load
    );
    print_audit(&report.audit_entries, &report.audit_queries);
    println!(
        "9. pickup latency (commit to handler start): idle p50 {:.1} ms, p99 {:.1} ms; behind {} queued jobs p50 {:.1} ms, p99 {:.1} ms",
        report.pickup_idle.p50_ms,
        report.pickup_idle.p99_ms,
        report.pickup_backlog,
        report.pickup_loaded.p50_ms,
        report.pickup_loaded.p99_ms
    );
    println!(
        "   a generation submitted to an idle queue (commit to start): p50 {:.1} ms, p99 {:.1} ms ({} of {} started before the client saw its commit, counted 0)",
        report.pickup_generation_idle.p50_ms,
        report.pickup_generation_idle.p99_ms,
        report.pickup_generation_early,
        report.pickup_generation_idle.samples
    );
    print_scrape(&report.scrape);
    print_purge(&report.purge);
    crate::bench_auth::print(&report.auth);
    println!("peak RSS of this process: {:.0} MiB", report.peak_rss_mib);
    println!("{}", serde_json::to_string(report).unwrap_or_default());
}

/// Part 8's table.
pub fn print_audit(
    fill: &crate::bench_scale::AuditFill,
    queries: &[crate::bench_scale::AuditQuery],
) {
    println!(
        "8. staff audit queries over {} entries ({} filled), 50 per page, p50 / p99 ms (rows per page):",
        fill.entries, fill.filled
    );
    for q in queries {
        println!(
            "   {:<26} first page {:>7.2} / {:>7.2} ({:>4.1})   deep cursor {:>7.2} / {:>7.2} ({:>4.1})",
            q.filter,
            q.first_page.p50_ms,
            q.first_page.p99_ms,
            q.first_page_rows,
            q.deep_cursor.p50_ms,
            q.deep_cursor.p99_ms,
            q.deep_cursor_rows
        );
    }
}
