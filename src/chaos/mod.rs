//! `slate chaos drive`: the driver of the multi-process soak with faults
//! (`scripts/chaos`, docs/CHAOS.md).
//!
//! `scripts/chaos` starts private PostgreSQL, Redis and s3s-fs instances,
//! migrates and opens accounts; this driver then
//!
//! 1. hosts a fake Fal provider ([`fake`]) whose behaviour is chosen per
//!    generation (success, transient errors, terminal failures, hangs);
//! 2. starts 2 `slate serve` and 3 `slate work` processes ([`procs`]);
//! 3. runs the load ([`load`]): generations submitted with Idempotency-Keys
//!    to both serves (retried with the same key on 5xx and timeouts, as a
//!    client would), signed Stripe events delivered several times each,
//!    shuffled, to both serves, reads, and a readiness probe;
//! 4. injects the faults: SIGKILL of a random worker (restarted), a
//!    PostgreSQL restart, a Redis restart, S3 stopped for a while (through
//!    `scripts/chaos svc …`), and the hanging provider;
//! 5. stops the faults, waits (bounded) for the system to drain, checks the
//!    invariants against the database, the API and S3 ([`checks`]), runs
//!    `slate projections verify`, prints the figures and exits 1 on any
//!    violation.
//!
//! A Rust program rather than a script so it reuses the signing
//! (`stripe::signature`), the fixtures, the projection list and the storage
//! client, and measures every answer with one clock.

mod checks;
pub mod fake;
mod load;
pub mod procs;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use uuid::Uuid;

use crate::config::Config;
use fake::{FakeFal, Scenario};
use procs::{Kind, Supervisor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A few minutes, a handful of kills: for CI.
    Ci,
    /// 45 minutes, more than 100 kills, the service faults three times.
    Long,
    /// 16 minutes of PostgreSQL restarts, ten of them, 5 to 55 s long,
    /// with the kills and the load of `Ci` and no other service fault:
    /// what a surviving process does when its database comes back.
    Outages,
}

#[derive(Debug, Clone)]
pub struct DriveOptions {
    pub mode: Mode,
    pub state: PathBuf,
    /// `account_id<TAB>api_key` lines (from `slate accounts create`).
    pub accounts: PathBuf,
    /// Runs `<control> <pg|redis|s3> <start|stop>`.
    pub control: String,
    pub serve_ports: Vec<u16>,
    pub provider_port: u16,
    pub seed: Option<u64>,
}

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub soak: Duration,
    pub workers: usize,
    pub kill_first: Duration,
    pub kill_every: Duration,
    /// (at, down for) — restarts of PostgreSQL, Redis, and S3 stops.
    pub pg_restarts: Vec<(Duration, Duration)>,
    pub redis_restarts: Vec<(Duration, Duration)>,
    pub s3_stops: Vec<(Duration, Duration)>,
    pub submitters: usize,
    /// Pause between one submitter's submissions (min, max) in ms.
    pub submit_pause_ms: (u64, u64),
    pub packs_per_account: usize,
    pub drain_limit: Duration,
    /// Weights of the scenarios.
    pub scenarios: Vec<(Scenario, u32)>,
}

impl Plan {
    pub fn for_mode(mode: Mode) -> Self {
        let s = Duration::from_secs;
        let mut scenarios = vec![
            (Scenario::Ok, 40),
            (Scenario::Slow, 10),
            (Scenario::Flaky, 12),
            (Scenario::FailSubmit, 6),
            (Scenario::FailModel, 6),
            (Scenario::HangOnce, 7),
            (Scenario::HangSubmitOnce, 5),
            (Scenario::HangDeadline, 3),
            (Scenario::Local, 8),
        ];
        match mode {
            Mode::Ci => Plan {
                soak: s(150),
                workers: 3,
                kill_first: s(12),
                kill_every: s(22),
                pg_restarts: vec![(s(45), s(10))],
                redis_restarts: vec![(s(75), s(5))],
                s3_stops: vec![(s(95), s(15))],
                submitters: 2,
                submit_pause_ms: (500, 1100),
                packs_per_account: 3,
                drain_limit: s(240),
                scenarios,
            },
            Mode::Long => {
                // A generation that hangs without a deadline fails after its
                // last attempt, minutes later: only where there is time.
                scenarios.push((Scenario::HangForever, 1));
                let minutes =
                    |m: &[u64], down: u64| m.iter().map(|m| (s(m * 60), s(down))).collect();
                Plan {
                    soak: s(45 * 60),
                    workers: 3,
                    kill_first: s(15),
                    kill_every: s(20),
                    pg_restarts: minutes(&[6, 21, 36], 12),
                    redis_restarts: minutes(&[10, 25, 40], 8),
                    s3_stops: minutes(&[14, 29, 43], 20),
                    submitters: 3,
                    submit_pause_ms: (700, 1500),
                    packs_per_account: 12,
                    drain_limit: s(600),
                    scenarios,
                }
            }
            Mode::Outages => Plan {
                soak: s(16 * 60),
                pg_restarts: [5, 12, 30, 55, 8, 12, 20, 6, 40, 12]
                    .iter()
                    .enumerate()
                    .map(|(i, &down)| (s(40 + 90 * i as u64), s(down)))
                    .collect(),
                redis_restarts: Vec::new(),
                s3_stops: Vec::new(),
                packs_per_account: 6,
                drain_limit: s(360),
                ..Plan::for_mode(Mode::Ci)
            },
        }
    }
}

/// A small deterministic generator (SplitMix64): the run prints its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// In 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn between_ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next_u64() % (hi.saturating_sub(lo) + 1))
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Account {
    pub id: Uuid,
    pub key: String,
}

/// A generation the API accepted (202).
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: Uuid,
    pub key: String,
    pub account: usize,
    pub scenario: Scenario,
}

/// Everything the load and the faults record.
#[derive(Debug, Default)]
pub struct Stats {
    /// (class, "status code[ error code]") → count.
    pub responses: BTreeMap<(&'static str, String), u64>,
    /// The same, for answers while PostgreSQL was down.
    pub outage_responses: BTreeMap<(&'static str, String), u64>,
    pub accepted: HashMap<Uuid, Accepted>,
    pub submissions: u64,
    pub submit_retries: u64,
    pub insufficient: u64,
    /// Keys given up on without a definitive answer: (account, key).
    pub unresolved: Vec<(usize, String)>,
    /// Stripe event id → acknowledged deliveries.
    pub webhook_acks: HashMap<String, u32>,
    pub webhook_deliveries: u64,
    pub reads: u64,
    pub timeline: Vec<(f64, String)>,
    pub recoveries: Vec<(String, f64)>,
    /// Jobs the killed workers held (queued or running) when killed.
    pub jobs_held_at_kill: u64,
    /// The generations whose jobs a killed worker held when it was killed:
    /// the only ones the provider may be paid for twice (an attempt killed
    /// between the provider's answer and the record of its handle).
    pub killed_generations: HashSet<Uuid>,
    /// Worker processes seen resuming by themselves after a PostgreSQL restart.
    pub workers_resumed: u64,
    /// PostgreSQL's outages as they happened: from the stop's start to the
    /// end of the start (the server accepting connections again).
    pub pg_outages: Vec<(Instant, Instant)>,
}

pub struct Ctx {
    pub http: reqwest::Client,
    pub serves: Vec<String>,
    pub accounts: Vec<Account>,
    pub secret: String,
    pub plan: Plan,
    pub mode: Mode,
    pub seed: u64,
    pub started: Instant,
    /// PostgreSQL is (being) stopped: answers are classed as outage answers.
    pub pg_down: AtomicBool,
    /// PostgreSQL is certainly down (a moment after the stop completed until
    /// the start begins): `/readyz` must not say ready.
    pub pg_hard_down: AtomicBool,
    /// The soak is over: no new submissions, reads or faults.
    pub stop_load: AtomicBool,
    /// Stop everything (the drain gave up).
    pub stop_all: AtomicBool,
    /// Every Stripe delivery was acknowledged.
    pub webhooks_done: AtomicBool,
    pub counter: AtomicU64,
    pub stats: Mutex<Stats>,
    pub violations: Mutex<Vec<String>>,
    pub supervisor: Mutex<Supervisor>,
    pub control: String,
    /// The driver's own connections (fault bookkeeping, the checks).
    pub pool: sqlx::PgPool,
}

impl Ctx {
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().expect("not poisoned")
    }

    pub fn violation(&self, what: String) {
        println!("  VIOLATION at {:>6.1}s: {what}", self.elapsed());
        self.violations.lock().expect("not poisoned").push(what);
    }

    pub fn event(&self, what: String) {
        let t = self.elapsed();
        println!("  [{t:>7.1}s] {what}");
        self.stats().timeline.push((t, what));
    }

    /// Run `<control> <service> <action>` (blocking, off the runtime).
    pub async fn control(&self, service: &str, action: &str) -> bool {
        let cmd = format!("{} {service} {action}", self.control);
        let result = tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .status()
        })
        .await;
        match result {
            Ok(Ok(s)) if s.success() => true,
            other => {
                self.violation(format!(
                    "fault injection `{service} {action}` failed: {other:?}"
                ));
                false
            }
        }
    }
}

fn read_accounts(path: &std::path::Path) -> anyhow::Result<Vec<Account>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (id, key) = l.split_once('\t').context("account lines are id<TAB>key")?;
            Ok(Account {
                id: id.trim().parse().context("account id")?,
                key: key.trim().to_owned(),
            })
        })
        .collect()
}

/// Run the soak; returns the exit code (0: every check passed).
pub async fn drive(config: &Config, opts: DriveOptions) -> anyhow::Result<i32> {
    let plan = Plan::for_mode(opts.mode);
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let accounts = read_accounts(&opts.accounts)?;
    anyhow::ensure!(
        !accounts.is_empty(),
        "no accounts in {}",
        opts.accounts.display()
    );
    let secret = config
        .stripe_webhook_secrets
        .first()
        .context("set STRIPE_WEBHOOK_SECRETS")?
        .expose()
        .to_owned();
    println!(
        "chaos soak ({:?}): {} s of load, {} accounts, seed {seed}",
        opts.mode,
        plan.soak.as_secs(),
        accounts.len()
    );

    // The fake provider.
    let provider_base = format!("http://127.0.0.1:{}", opts.provider_port);
    let fal = FakeFal::new(provider_base.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.provider_port))
        .await
        .with_context(|| format!("binding the fake provider on {}", opts.provider_port))?;
    let app = fal.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    // The processes.
    let bin = std::env::current_exe().context("the slate binary")?;
    let common: Vec<(String, String)> = [
        ("FAL_KEY", "chaos-fake-key"),
        ("FAL_BASE_URL", provider_base.as_str()),
        ("SLATE_MEDIA_ALLOWLIST", "127.0.0.1"),
        ("SLATE_LOCAL_PROVIDER", "true"),
        ("SLATE_WORKER_HEARTBEAT_SECS", "1"),
        ("SLATE_WORKER_MISSED_HEARTBEATS", "3"),
        ("SLATE_SWEEP_INTERVAL_SECS", "5"),
        ("SLATE_PROVIDER_POLL_MS", "400"),
        ("SLATE_RATE_LIMIT_ACCOUNT_PER_MIN", "100000"),
        ("SLATE_RATE_LIMIT_IP_PER_MIN", "100000"),
        ("SLATE_LOG_FORMAT", "json"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let mut supervisor = Supervisor::new(bin.clone(), &opts.state);
    for (i, port) in opts.serve_ports.iter().enumerate() {
        let mut env = common.clone();
        env.push(("SLATE_LISTEN".into(), format!("127.0.0.1:{port}")));
        supervisor.add(&format!("serve-{}", i + 1), Kind::Serve, env)?;
    }
    for i in 0..plan.workers {
        supervisor.add(&format!("work-{}", i + 1), Kind::Work, common.clone())?;
    }

    let pool = slate_events::db::connect(config.database_url.expose(), 4)
        .await
        .context("connecting to the soak's PostgreSQL")?;
    let http = reqwest::Client::builder()
        .timeout(load::CLIENT_TIMEOUT)
        .connect_timeout(Duration::from_secs(3))
        .build()?;
    let ctx = Arc::new(Ctx {
        http,
        serves: opts
            .serve_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect(),
        accounts,
        secret,
        plan: plan.clone(),
        mode: opts.mode,
        seed,
        started: Instant::now(),
        pg_down: AtomicBool::new(false),
        pg_hard_down: AtomicBool::new(false),
        stop_load: AtomicBool::new(false),
        stop_all: AtomicBool::new(false),
        webhooks_done: AtomicBool::new(false),
        counter: AtomicU64::new(0),
        stats: Mutex::default(),
        violations: Mutex::default(),
        supervisor: Mutex::new(supervisor),
        control: opts.control.clone(),
        pool: pool.clone(),
    });

    // The supervisor's loop runs until the very end.
    let sup_ctx = ctx.clone();
    let supervising = tokio::spawn(async move {
        while !sup_ctx.stop_all.load(Ordering::Relaxed) {
            let down = sup_ctx.pg_down.load(Ordering::Relaxed);
            if let Err(e) = sup_ctx.supervisor.lock().expect("not poisoned").tick(down) {
                sup_ctx.violation(format!("supervisor: {e:#}"));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });

    load::wait_ready(&ctx, &pool).await?;
    ctx.event(format!(
        "{} serve and {} work processes ready",
        opts.serve_ports.len(),
        plan.workers
    ));

    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..plan.submitters {
        tasks.push(tokio::spawn(load::submitter(ctx.clone(), i)));
    }
    tasks.push(tokio::spawn(load::reader(ctx.clone())));
    let probe = tokio::spawn(load::readiness_probe(ctx.clone()));
    let webhooks = tokio::spawn(load::webhooks(ctx.clone()));
    let kills = tokio::spawn(load::kill_workers(ctx.clone()));
    let service_faults = tokio::spawn(load::service_faults(ctx.clone()));

    tokio::time::sleep(plan.soak).await;
    ctx.stop_load.store(true, Ordering::Relaxed);
    ctx.event("soak over: no new submissions or faults".into());
    // A driver task that panicked stopped its load or its faults early: the
    // soak did less than it says, which is a failure, not a pass.
    let joined = |what: &str, r: Result<(), tokio::task::JoinError>| {
        if let Err(e) = r {
            ctx.violation(format!("the {what} task ended early: {e}"));
        }
    };
    joined("worker kills", kills.await);
    joined("service faults", service_faults.await);
    for t in tasks {
        joined("load", t.await);
    }
    let soak_secs = started.elapsed().as_secs_f64();

    let drained = checks::drain(&ctx, &pool).await;
    ctx.stop_all.store(true, Ordering::Relaxed);
    joined("webhooks", webhooks.await);
    joined("readiness probe", probe.await);
    joined("supervisor", supervising.await);

    let fake = fal.stats();
    let report = checks::check(&ctx, &pool, config, drained, &bin, &fake.twice).await;
    let (killed, failed) = tokio::task::block_in_place(|| {
        ctx.supervisor
            .lock()
            .expect("not poisoned")
            .stop_all(Duration::from_secs(40))
    });
    if !killed.is_empty() {
        ctx.violation(format!("did not stop on SIGTERM within 40 s: {killed:?}"));
    }
    if !failed.is_empty() {
        ctx.violation(format!("exited with a failure on SIGTERM: {failed:?}"));
    }
    checks::summary(&ctx, &report, &fake, soak_secs);
    let violations = ctx.violations.lock().expect("not poisoned").len();
    if violations > 0 {
        println!("\nchaos soak FAILED: {violations} violation(s)");
        Ok(1)
    } else {
        println!("\nchaos soak passed: every invariant held");
        Ok(0)
    }
}
