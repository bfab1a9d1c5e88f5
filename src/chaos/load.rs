//! The soak's load and faults: submitters, readers, the readiness probe,
//! the Stripe deliverer, worker kills and the service faults.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::fake::Scenario;
use super::{Accepted, Ctx, Rng};

/// A client's patience: an answer later than this counts as a hang.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

const CHECKOUT: &str =
    include_str!("../../tests/fixtures/stripe/01_checkout_session_completed_pack.json");
const REFUND: &str = include_str!("../../tests/fixtures/stripe/09_charge_refunded_partial.json");
const UNKNOWN: &str = include_str!("../../tests/fixtures/stripe/x_unknown_type.json");

/// Credits of one pack (the fixture's `metadata.credits`) and what its
/// partial refund (1000 of 2000 cents) revokes.
pub const PACK_CREDITS: i64 = 500;
pub const REFUND_CREDITS: i64 = 250;

pub enum Answer {
    Status(u16, Value),
    Timeout,
    Connect,
    Other,
}

/// Send, classify and record one request. A 5xx other than 503, or no
/// answer within the client's timeout, is a violation.
pub async fn send(ctx: &Ctx, class: &'static str, rb: reqwest::RequestBuilder) -> Answer {
    let during_outage = ctx.pg_down.load(Ordering::Relaxed);
    let started = Instant::now();
    let result = rb.send().await;
    let answer = match result {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.json::<Value>().await.unwrap_or(Value::Null);
            Answer::Status(status, body)
        }
        Err(e) if e.is_timeout() => Answer::Timeout,
        Err(e) if e.is_connect() => Answer::Connect,
        Err(_) => Answer::Other,
    };
    let label = match &answer {
        Answer::Status(s, body) => match body["error"]["code"].as_str() {
            Some(code) if *s >= 400 => format!("{s} {code}"),
            _ => s.to_string(),
        },
        Answer::Timeout => "timeout".into(),
        Answer::Connect => "connect error".into(),
        Answer::Other => "transport error".into(),
    };
    let during_outage = during_outage || ctx.pg_down.load(Ordering::Relaxed);
    {
        let mut stats = ctx.stats();
        *stats.responses.entry((class, label.clone())).or_default() += 1;
        if during_outage {
            *stats
                .outage_responses
                .entry((class, label.clone()))
                .or_default() += 1;
        }
    }
    match &answer {
        Answer::Status(s, _) if *s >= 500 && *s != 503 => ctx.violation(format!(
            "{class}: HTTP {label}{}",
            outage_note(during_outage)
        )),
        Answer::Timeout => ctx.violation(format!(
            "{class}: no answer within {} s (after {:.1} s){}",
            CLIENT_TIMEOUT.as_secs(),
            started.elapsed().as_secs_f64(),
            outage_note(during_outage)
        )),
        Answer::Connect | Answer::Other => {
            ctx.violation(format!("{class}: {label}{}", outage_note(during_outage)))
        }
        _ => {}
    }
    answer
}

fn outage_note(during: bool) -> &'static str {
    if during {
        " while PostgreSQL was down"
    } else {
        ""
    }
}

/// Both serves answer `/readyz` 200 and every worker has registered.
pub async fn wait_ready(ctx: &Ctx, pool: &PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut ready = 0;
        for s in &ctx.serves {
            if let Ok(r) = ctx.http.get(format!("{s}/readyz")).send().await
                && r.status().is_success()
            {
                ready += 1;
            }
        }
        // Work processes, not rows: one process has four generation
        // fetchers (`<process>.generations.<n>`).
        let workers: i64 = sqlx::query_scalar(
            "select count(distinct split_part(id, '.generations.', 1)) from apalis.workers
              where worker_type = 'slate.generations' and last_seen > now() - interval '5 seconds'",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(0);
        if ready == ctx.serves.len() && workers >= ctx.plan.workers as i64 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the processes did not become ready within 90 s ({ready} serves ready, {workers} workers)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn pick_scenario(ctx: &Ctx, rng: &mut Rng) -> Scenario {
    let total: u32 = ctx.plan.scenarios.iter().map(|(_, w)| w).sum();
    let mut x = (rng.next_u64() % u64::from(total)) as u32;
    for (s, w) in &ctx.plan.scenarios {
        if x < *w {
            return *s;
        }
        x -= w;
    }
    Scenario::Ok
}

fn submission(scenario: Scenario, key: &str) -> Value {
    match scenario {
        Scenario::Local => json!({
            "kind": "script", "provider": "local",
            "prompt": format!("chaos script {key}"), "collection_id": "chaos"
        }),
        _ => {
            let mut body = json!({
                "kind": "video", "provider": "fal",
                "prompt": format!("chaos clip {key}"),
                "parameters": {
                    "duration": if scenario == Scenario::Slow { 2 } else { 1 },
                    "scenario": scenario.name()
                },
                "collection_id": "chaos"
            });
            if scenario == Scenario::HangDeadline {
                body["deadline_seconds"] = json!(40);
            }
            body
        }
    }
}

/// Submit generations until the soak is over.
pub async fn submitter(ctx: Arc<Ctx>, index: usize) {
    let mut rng = Rng::new(ctx.seed ^ (0x5eed_u64 + index as u64 * 7919));
    while !ctx.stop_load.load(Ordering::Relaxed) {
        let n = ctx.counter.fetch_add(1, Ordering::Relaxed);
        let account = rng.below(ctx.accounts.len());
        let scenario = pick_scenario(&ctx, &mut rng);
        let key = format!("chaos-{}-{n}", ctx.seed % 1_000_000);
        submit(&ctx, &mut rng, account, scenario, &key).await;
        let (lo, hi) = ctx.plan.submit_pause_ms;
        tokio::time::sleep(rng.between_ms(lo, hi)).await;
    }
}

/// One logical submission: retried with the same Idempotency-Key on 503,
/// 429 and transport failures, alternating serves, for up to two minutes.
async fn submit(ctx: &Ctx, rng: &mut Rng, account: usize, scenario: Scenario, key: &str) {
    let body = submission(scenario, key);
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut serve = rng.below(ctx.serves.len());
    ctx.stats().submissions += 1;
    let mut tries = 0u32;
    loop {
        tries += 1;
        if tries > 1 {
            ctx.stats().submit_retries += 1;
        }
        let rb = ctx
            .http
            .post(format!("{}/v1/generations", ctx.serves[serve]))
            .bearer_auth(&ctx.accounts[account].key)
            .header("Idempotency-Key", key)
            .json(&body);
        match send(ctx, "submit", rb).await {
            Answer::Status(202, v) => {
                match v["id"].as_str().and_then(|s| s.parse::<Uuid>().ok()) {
                    Some(id) => {
                        ctx.stats().accepted.insert(
                            id,
                            Accepted {
                                id,
                                key: key.to_owned(),
                                account,
                                scenario,
                            },
                        );
                    }
                    None => ctx.violation(format!("submit: a 202 without an id for {key}")),
                }
                return;
            }
            Answer::Status(402, _) => {
                ctx.stats().insufficient += 1;
                return;
            }
            Answer::Status(429 | 503, _) | Answer::Timeout | Answer::Connect | Answer::Other => {}
            Answer::Status(s, v) if s >= 500 => {
                let _ = v;
            }
            Answer::Status(s, v) => {
                ctx.violation(format!(
                    "submit: unexpected HTTP {s} {} for {key}",
                    v["error"]["code"].as_str().unwrap_or("")
                ));
                return;
            }
        }
        if Instant::now() > give_up || ctx.stop_all.load(Ordering::Relaxed) {
            ctx.stats().unresolved.push((account, key.to_owned()));
            return;
        }
        serve = (serve + 1) % ctx.serves.len();
        tokio::time::sleep(Duration::from_millis(500 * u64::from(tries.min(6)))).await;
    }
}

/// Balances, lists and single generations, until the soak is over.
pub async fn reader(ctx: Arc<Ctx>) {
    let mut rng = Rng::new(ctx.seed ^ 0x7ead);
    while !ctx.stop_load.load(Ordering::Relaxed) {
        let account = rng.below(ctx.accounts.len());
        let base = &ctx.serves[rng.below(ctx.serves.len())];
        let url = match rng.below(3) {
            0 => format!("{base}/v1/credits"),
            1 => format!("{base}/v1/generations"),
            _ => {
                // Any of the account's accepted generations, not always
                // the same one.
                let id = {
                    let stats = ctx.stats();
                    let mine: Vec<_> = stats
                        .accepted
                        .values()
                        .filter(|a| a.account == account)
                        .map(|a| a.id)
                        .collect();
                    (!mine.is_empty()).then(|| mine[rng.below(mine.len())])
                };
                match id {
                    Some(id) => format!("{base}/v1/generations/{id}"),
                    None => format!("{base}/v1/credits"),
                }
            }
        };
        let rb = ctx.http.get(url).bearer_auth(&ctx.accounts[account].key);
        if let Answer::Status(s, _) = send(&ctx, "read", rb).await
            && s != 200
            && s != 503
        {
            ctx.violation(format!("read: unexpected HTTP {s}"));
        }
        ctx.stats().reads += 1;
        tokio::time::sleep(rng.between_ms(250, 600)).await;
    }
}

/// `/readyz` on every serve twice a second: it must answer (200 or 503),
/// and never say ready while PostgreSQL is certainly down.
pub async fn readiness_probe(ctx: Arc<Ctx>) {
    while !ctx.stop_all.load(Ordering::Relaxed) {
        for s in &ctx.serves {
            let hard_down = ctx.pg_hard_down.load(Ordering::Relaxed);
            let answer = send(&ctx, "readyz", ctx.http.get(format!("{s}/readyz"))).await;
            if let Answer::Status(200, _) = answer
                && hard_down
                && ctx.pg_hard_down.load(Ordering::Relaxed)
            {
                ctx.violation(format!("{s}/readyz said ready while PostgreSQL was down"));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Seconds until every serve's `/readyz` answers 200 (None: not within
/// `limit`).
async fn ready_again(ctx: &Ctx, limit: Duration) -> Option<f64> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let mut ready = 0;
        for s in &ctx.serves {
            if let Ok(r) = ctx.http.get(format!("{s}/readyz")).send().await
                && r.status().is_success()
            {
                ready += 1;
            }
        }
        if ready == ctx.serves.len() {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

struct Delivery {
    event_id: String,
    body: String,
    due: Instant,
}

fn event(template: &str, account: Uuid, run: &str) -> (String, String) {
    let body = template
        .replace("{{ACCOUNT_ID}}", &account.to_string())
        .replace("{{RUN}}", run);
    let id = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (id, body)
}

/// The Stripe events of the run: per account `packs_per_account` credit
/// packs (the first account gets one, so it runs out), a partial refund of
/// every third pack, and one event type Slate ignores. Each is delivered 2
/// or 3 times, shuffled over the first 70 % of the soak (each account's
/// first pack early), to a random serve; a delivery that is not
/// acknowledged is retried, as Stripe does. Returns when all are
/// acknowledged (or everything stops).
pub async fn webhooks(ctx: Arc<Ctx>) {
    let mut rng = Rng::new(ctx.seed ^ 0x57e1);
    let now = Instant::now();
    let spread = ctx.plan.soak.mul_f64(0.7);
    let mut plan: Vec<Delivery> = Vec::new();
    let mut push = |rng: &mut Rng, id: String, body: String, early: bool| {
        let copies = 2 + rng.below(2);
        for c in 0..copies {
            let due = if early && c == 0 {
                now + rng.between_ms(0, 2000)
            } else {
                now + rng.between_ms(0, spread.as_millis() as u64)
            };
            plan.push(Delivery {
                event_id: id.clone(),
                body: body.clone(),
                due,
            });
        }
    };
    for (a, account) in ctx.accounts.iter().enumerate() {
        let packs = if a == 0 {
            1
        } else {
            ctx.plan.packs_per_account
        };
        for p in 0..packs {
            let run = format!("c{}a{a}p{p}", ctx.seed % 100_000);
            let (id, body) = event(CHECKOUT, account.id, &run);
            push(&mut rng, id, body, p == 0);
            if p % 3 == 1 {
                let (id, body) = event(REFUND, account.id, &run);
                push(&mut rng, id, body, false);
            }
        }
        let (id, body) = event(
            UNKNOWN,
            account.id,
            &format!("c{}a{a}u", ctx.seed % 100_000),
        );
        push(&mut rng, id, body, false);
    }
    rng.shuffle(&mut plan);
    plan.sort_by_key(|d| d.due);
    let mut queue: VecDeque<Delivery> = plan.into();
    let permits = Arc::new(tokio::sync::Semaphore::new(4));
    let (retry_tx, mut retry_rx) = tokio::sync::mpsc::unbounded_channel::<Delivery>();
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        while let Ok(d) = retry_rx.try_recv() {
            queue.push_back(d);
        }
        while in_flight.try_join_next().is_some() {}
        if ctx.stop_all.load(Ordering::Relaxed) {
            break;
        }
        if queue.is_empty() && in_flight.is_empty() {
            match tokio::time::timeout(Duration::from_millis(200), retry_rx.recv()).await {
                Ok(Some(d)) => queue.push_back(d),
                Ok(None) => break,
                Err(_) if in_flight.is_empty() && queue.is_empty() => break,
                Err(_) => {}
            }
            continue;
        }
        // The next due delivery (the queue is roughly in due order; retries
        // go to the back with their own due time).
        let next = queue
            .iter()
            .enumerate()
            .min_by_key(|(_, d)| d.due)
            .map(|(i, _)| i);
        let Some(i) = next else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if queue[i].due > Instant::now() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let d = queue.remove(i).expect("index in range");
        let permit = permits.clone().acquire_owned().await.expect("open");
        let (ctx2, tx) = (ctx.clone(), retry_tx.clone());
        let serve = rng.below(ctx.serves.len());
        in_flight.spawn(async move {
            let _permit = permit;
            let header = crate::stripe::signature::sign(
                &ctx2.secret,
                chrono::Utc::now().timestamp(),
                d.body.as_bytes(),
            );
            let rb = ctx2
                .http
                .post(format!("{}/webhooks/stripe", ctx2.serves[serve]))
                .header("stripe-signature", header)
                .header("content-type", "application/json")
                .body(d.body.clone());
            ctx2.stats().webhook_deliveries += 1;
            match send(&ctx2, "webhook", rb).await {
                Answer::Status(s, _) if (200..300).contains(&s) => {
                    *ctx2.stats().webhook_acks.entry(d.event_id).or_default() += 1;
                }
                Answer::Status(s, v) if (400..500).contains(&s) => {
                    ctx2.violation(format!(
                        "webhook {}: HTTP {s} {}",
                        d.event_id,
                        v["error"]["code"].as_str().unwrap_or("")
                    ));
                }
                _ => {
                    // Stripe retries later.
                    let _ = tx.send(Delivery {
                        due: Instant::now() + Duration::from_secs(2),
                        ..d
                    });
                }
            }
        });
    }
    in_flight.shutdown().await;
    let left = queue.len();
    if left == 0 {
        ctx.webhooks_done.store(true, Ordering::Relaxed);
    }
    if left > 0 {
        ctx.violation(format!("{left} webhook deliveries never acknowledged"));
    }
}

/// SIGKILL a random worker every `kill_every`, restart it 0.5–3 s later.
pub async fn kill_workers(ctx: Arc<Ctx>) {
    let mut rng = Rng::new(ctx.seed ^ 0x4b11);
    tokio::time::sleep(ctx.plan.kill_first).await;
    while !ctx.stop_load.load(Ordering::Relaxed) {
        let restart_in = rng.between_ms(500, 3000);
        let pick = rng.next_u64() as usize;
        let target = ctx
            .supervisor
            .lock()
            .expect("not poisoned")
            .pick_worker(|n| pick % n);
        let Some((i, pid)) = target else {
            ctx.event("no worker running to kill".into());
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        };
        // Jobs it holds right now (worker names carry the pid).
        let holding: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs
              where status in ('Queued', 'Running') and lock_by like '%-' || $1 || '-%'",
        )
        .bind(pid.to_string())
        .fetch_one(&ctx.pool)
        .await
        .unwrap_or(-1);
        let killed = ctx
            .supervisor
            .lock()
            .expect("not poisoned")
            .kill(i, pid, restart_in);
        match killed {
            Ok(Some(name)) => {
                if holding > 0 {
                    ctx.stats().jobs_held_at_kill += holding as u64;
                }
                // Its generations, as the queue still names them (a dead
                // worker's jobs stay locked by its name until they are
                // taken for orphans, which needs the database too). Asked
                // until PostgreSQL answers: a kill during an outage is the
                // case the check allows most.
                let asked = Instant::now();
                let held: Vec<Option<String>> = loop {
                    match sqlx::query_scalar(
                        "select convert_from(job, 'UTF8')::jsonb->>'generation_id' from apalis.jobs
                          where job_type = 'slate.generations' and status in ('Queued', 'Running')
                            and lock_by like '%-' || $1 || '-%'",
                    )
                    .bind(pid.to_string())
                    .fetch_all(&ctx.pool)
                    .await
                    {
                        Ok(held) => break held,
                        Err(e) if asked.elapsed() > Duration::from_secs(180) => {
                            ctx.violation(format!(
                                "the jobs of a killed worker could not be read: {e}"
                            ));
                            break Vec::new();
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                };
                ctx.stats().killed_generations.extend(
                    held.iter()
                        .flatten()
                        .filter_map(|g| g.parse::<uuid::Uuid>().ok()),
                );
                ctx.event(format!(
                    "SIGKILL {name} holding {} jobs; restart in {:.1} s",
                    if holding < 0 {
                        "?".to_owned()
                    } else {
                        holding.to_string()
                    },
                    restart_in.as_secs_f64()
                ))
            }
            Ok(None) => {}
            Err(e) => ctx.violation(format!("killing a worker: {e:#}")),
        }
        let jitter = rng.between_ms(0, 4000);
        tokio::time::sleep((ctx.plan.kill_every + jitter).saturating_sub(Duration::from_secs(2)))
            .await;
    }
}

enum Service {
    Pg,
    Redis,
    S3,
}

/// The service faults, in time order.
pub async fn service_faults(ctx: Arc<Ctx>) {
    let mut faults: Vec<(Duration, Duration, Service)> = Vec::new();
    faults.extend(
        ctx.plan
            .pg_restarts
            .iter()
            .map(|&(at, d)| (at, d, Service::Pg)),
    );
    faults.extend(
        ctx.plan
            .redis_restarts
            .iter()
            .map(|&(at, d)| (at, d, Service::Redis)),
    );
    faults.extend(
        ctx.plan
            .s3_stops
            .iter()
            .map(|&(at, d)| (at, d, Service::S3)),
    );
    faults.sort_by_key(|f| f.0);
    let start = Instant::now();
    for (at, down, service) in faults {
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if ctx.stop_load.load(Ordering::Relaxed) {
            return;
        }
        match service {
            Service::Pg => pg_restart(&ctx, down).await,
            Service::Redis => {
                ctx.event(format!("Redis stopped for {} s", down.as_secs()));
                ctx.control("redis", "stop").await;
                tokio::time::sleep(down).await;
                ctx.control("redis", "start").await;
                recovered(&ctx, "Redis").await;
            }
            Service::S3 => {
                ctx.event(format!("S3 (s3s-fs) stopped for {} s", down.as_secs()));
                ctx.control("s3", "stop").await;
                tokio::time::sleep(down).await;
                ctx.control("s3", "start").await;
                ctx.event("S3 started again".into());
            }
        }
    }
}

async fn pg_restart(ctx: &Ctx, down: Duration) {
    ctx.event(format!(
        "PostgreSQL stopped (immediate, as in a crash) for {} s",
        down.as_secs()
    ));
    ctx.pg_down.store(true, Ordering::Relaxed);
    let before = ctx
        .supervisor
        .lock()
        .expect("not poisoned")
        .running(super::procs::Kind::Work);
    let stopped = Instant::now();
    ctx.control("pg", "stop").await;
    // Readiness checks in flight when it stopped may still finish green.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ctx.pg_hard_down.store(true, Ordering::Relaxed);
    tokio::time::sleep(down.saturating_sub(Duration::from_secs(3))).await;
    ctx.pg_hard_down.store(false, Ordering::Relaxed);
    ctx.control("pg", "start").await;
    ctx.stats().pg_outages.push((stopped, Instant::now()));
    recovered(ctx, "PostgreSQL").await;
    ctx.pg_down.store(false, Ordering::Relaxed);
    workers_resumed(ctx, &before).await;
}

/// Every worker process that lived through the outage takes jobs again by
/// itself: its generation worker heartbeats within 30 s (worker names carry
/// the pid). Processes killed meanwhile are not judged.
async fn workers_resumed(ctx: &Ctx, before: &[(String, u32)]) {
    let started = Instant::now();
    let mut waiting: Vec<(String, u32)> = before.to_vec();
    while !waiting.is_empty() {
        let alive = ctx
            .supervisor
            .lock()
            .expect("not poisoned")
            .running(super::procs::Kind::Work);
        waiting.retain(|w| alive.contains(w));
        let mut still = Vec::new();
        for (name, pid) in waiting {
            let beating: bool = sqlx::query_scalar(
                "select exists(select 1 from apalis.workers
                  where worker_type = 'slate.generations' and id like '%-' || $1 || '-%'
                    and last_seen > now() - interval '3 seconds')",
            )
            .bind(pid.to_string())
            .fetch_one(&ctx.pool)
            .await
            .unwrap_or(false);
            if !beating {
                still.push((name, pid));
            }
        }
        waiting = still;
        if waiting.is_empty() {
            ctx.event(format!(
                "every surviving worker takes jobs again ({:.1} s after PostgreSQL was back)",
                started.elapsed().as_secs_f64()
            ));
            ctx.stats().workers_resumed += before.len() as u64;
            return;
        }
        if started.elapsed() > Duration::from_secs(30) {
            ctx.violation(format!(
                "worker processes did not take jobs again within 30 s of the PostgreSQL restart: {waiting:?}"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn recovered(ctx: &Ctx, what: &str) {
    match ready_again(ctx, Duration::from_secs(60)).await {
        Some(secs) => {
            ctx.event(format!(
                "{what} back: every serve ready again {secs:.1} s after the start"
            ));
            ctx.stats().recoveries.push((what.to_owned(), secs));
        }
        None => ctx.violation(format!(
            "{what} back, but the serves were not ready within 60 s"
        )),
    }
}
