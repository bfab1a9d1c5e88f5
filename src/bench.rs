//! `slate bench`: measured figures, never timed tests. Runs against the real
//! local services in a scratch database that it drops afterwards. Build with
//! `--release` for figures worth quoting.
//!
//! 1. raw ceiling: single-row INSERT transactions/s into a table shaped like
//!    `events`, at 1, 8 and 32 connections;
//! 2. event appends/s through the event store at the same concurrencies;
//! 3. verified Stripe webhook ingest over HTTP at N concurrent senders:
//!    req/s, p50, p99.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use slate_events::Metadata;
use slate_events::catalog::{AccountCreated, DomainEvent};
use slate_events::store::{self, ExpectedVersion, NewEvent};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
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
}

impl BenchOptions {
    pub fn quick() -> Self {
        Self {
            seconds: 2.0,
            webhooks: 2_000,
            senders: 32,
            jobs: 300,
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
    pub noop_per_second: f64,
    pub generations_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub build: &'static str,
    pub insert_ceiling: Vec<Throughput>,
    pub event_appends: Vec<Throughput>,
    pub webhook_ingest: Latency,
    pub jobs: Jobs,
    pub peak_rss_mib: f64,
}

const LEVELS: [usize; 3] = [1, 8, 32];

pub async fn run(config: &Config, opts: &BenchOptions) -> anyhow::Result<Report> {
    let base: PgConnectOptions = config.database_url.expose().parse()?;
    let db = format!("slate_bench_{}", Uuid::new_v4().simple());
    let mut admin = base
        .clone()
        .database("postgres")
        .disable_statement_logging()
        .connect()
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
        .execute(&mut admin)
        .await?;
    let result = run_in(config, opts, base.clone().database(&db)).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "drop database if exists {db} with (force)"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await.ok();
    result
}

async fn run_in(
    config: &Config,
    opts: &BenchOptions,
    options: PgConnectOptions,
) -> anyhow::Result<Report> {
    let options = options.disable_statement_logging();
    let pool = PgPoolOptions::new()
        .max_connections(40)
        .connect_with(options.clone())
        .await?;
    crate::migrate::run(&pool).await?;
    sqlx::query(
        "create table bench_ceiling (
            global_position bigint generated always as identity primary key,
            event_id uuid not null unique, stream_id text not null, stream_version integer not null,
            event_type text not null, schema_version smallint not null, payload jsonb not null,
            metadata jsonb not null default '{}', recorded_at timestamptz not null default now(),
            transaction_id xid8 not null default pg_current_xact_id(),
            unique (stream_id, stream_version))",
    )
    .execute(&pool)
    .await?;

    let duration = Duration::from_secs_f64(opts.seconds);
    let mut insert_ceiling = Vec::new();
    let mut event_appends = Vec::new();
    for &c in &LEVELS {
        let n = for_duration(&pool, c, duration, move |pool, worker, i| async move {
            sqlx::query(
                "insert into bench_ceiling (event_id, stream_id, stream_version, event_type, schema_version, payload)
                 values ($1, $2, 1, 'AccountCreated', 2, $3)",
            )
            .bind(Uuid::new_v4())
            .bind(format!("bench-{c}-{worker}-{i}"))
            .bind(json!({"account_id": Uuid::nil(), "email": "bench@example.com", "staff": false}))
            .execute(&pool)
            .await
            .map(|_| ())
        })
        .await?;
        insert_ceiling.push(Throughput {
            connections: c,
            per_second: n,
        });
        let n = for_duration(&pool, c, duration, move |pool, worker, i| async move {
            let mut conn = pool.acquire().await?;
            let event = NewEvent::new(
                DomainEvent::AccountCreated(AccountCreated {
                    account_id: Uuid::nil(),
                    email: "bench@example.com".into(),
                    staff: false,
                }),
                Metadata::system(),
            );
            store::append(
                &mut conn,
                &format!("bench-{c}-{worker}-{i}"),
                ExpectedVersion::NoStream,
                &[event],
            )
            .await
            .map(|_| ())
            .map_err(|e| match e {
                slate_events::Error::Database(e) => e,
                other => sqlx::Error::Protocol(other.to_string()),
            })
        })
        .await?;
        event_appends.push(Throughput {
            connections: c,
            per_second: n,
        });
    }

    let webhook_ingest = webhooks(config, &pool, opts).await?;
    let jobs = Jobs {
        jobs: opts.jobs,
        noop_per_second: slate_workers::bench::noop_jobs_per_second(&pool, opts.jobs).await?,
        generations_per_second: slate_workers::bench::generations_per_second(
            &pool,
            &config.storage(),
            opts.jobs,
            8,
        )
        .await?,
    };
    pool.close().await;
    Ok(Report {
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        insert_ceiling,
        event_appends,
        webhook_ingest,
        jobs,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Run `op` on `workers` concurrent tasks for `duration`; operations/s.
async fn for_duration<F, Fut>(
    pool: &PgPool,
    workers: usize,
    duration: Duration,
    op: F,
) -> anyhow::Result<f64>
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
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

const WEBHOOK_SECRET: &str = "whsec_bench_secret";
const EVENT_TEMPLATE: &str =
    include_str!("../tests/fixtures/stripe/01_checkout_session_completed_pack.json");

async fn webhooks(config: &Config, pool: &PgPool, opts: &BenchOptions) -> anyhow::Result<Latency> {
    let mut config = config.clone();
    config.stripe_webhook_secrets = vec![Secret::new(WEBHOOK_SECRET)];
    config.livemode = false;
    let state = crate::http::AppState::new(config, pool.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/webhooks/stripe", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::serve(listener, state, async move {
        let _ = stop_rx.await;
    }));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(opts.senders)
        .build()?;
    let account = Uuid::now_v7();
    let per_sender = opts.webhooks.div_ceil(opts.senders);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..opts.senders {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_sender);
            let mut errors = 0usize;
            for i in 0..per_sender {
                let body = EVENT_TEMPLATE
                    .replace("{{ACCOUNT_ID}}", &account.to_string())
                    .replace("{{RUN}}", &format!("b{s}x{i}"));
                let header = crate::stripe::signature::sign(
                    WEBHOOK_SECRET,
                    chrono::Utc::now().timestamp(),
                    body.as_bytes(),
                );
                let t = Instant::now();
                let ok = client
                    .post(&url)
                    .header("stripe-signature", header)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                if !ok {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    let _ = server.await;
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| all[((all.len() as f64 - 1.0) * p).round() as usize];
    Ok(Latency {
        senders: opts.senders,
        requests: all.len(),
        per_second: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        errors,
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

pub fn print(report: &Report) {
    println!("slate bench ({} build)", report.build);
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
    row(
        "1. raw INSERT transactions/s (ceiling)",
        &report.insert_ceiling,
    );
    row("2. event appends/s", &report.event_appends);
    let ratio: Vec<String> = report
        .event_appends
        .iter()
        .zip(&report.insert_ceiling)
        .map(|(a, c)| format!("{:.2}", a.per_second / c.per_second))
        .collect();
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "   ratio to the ceiling", ratio[0], ratio[1], ratio[2]
    );
    let w = &report.webhook_ingest;
    println!(
        "3. webhook ingest, {} senders, {} requests: {:.0} req/s (ratio to ceiling at 32: {:.2}), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors",
        w.senders,
        w.requests,
        w.per_second,
        w.per_second / report.insert_ceiling[2].per_second,
        w.p50_ms,
        w.p99_ms,
        w.max_ms,
        w.errors
    );
    let j = &report.jobs;
    println!(
        "4. {} jobs: bare apalis no-op {:.0} jobs/s; end-to-end generations (instant local provider, S3 upload, capture) {:.0}/s (ratio {:.2})",
        j.jobs,
        j.noop_per_second,
        j.generations_per_second,
        j.generations_per_second / j.noop_per_second
    );
    println!("peak RSS of this process: {:.0} MiB", report.peak_rss_mib);
    println!("{}", serde_json::to_string(report).unwrap_or_default());
}
