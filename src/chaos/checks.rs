//! The end of the soak: drain (bounded), then the invariants, checked
//! against the database, the API and S3, and the figures.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use slate_events::projections::Projection;
use sqlx::PgPool;
use uuid::Uuid;

use super::fake::{FakeStats, Scenario};
use super::load::{PACK_CREDITS, REFUND_CREDITS};
use super::{Ctx, Mode};
use crate::config::Config;

const OUTCOMES: &[&str] = &[
    "CreditsReserved",
    "CreditsCaptured",
    "CreditsReleased",
    "GenerationRequested",
    "GenerationSucceeded",
    "GenerationFailed",
    "GenerationCanceled",
];

#[derive(Debug, Default, Clone)]
struct Progress {
    unfinished: i64,
    stripe_pending: i64,
    live_jobs: i64,
    projection_lag: i64,
}

impl Progress {
    fn done(&self) -> bool {
        self.unfinished == 0
            && self.stripe_pending == 0
            && self.live_jobs == 0
            && self.projection_lag == 0
    }
}

async fn progress(pool: &PgPool) -> Result<Progress, sqlx::Error> {
    let (unfinished, stripe_pending, live_jobs): (i64, i64, i64) = sqlx::query_as(concat!(
        "select
           (select count(*) from generations where status in ('queued', 'running')),
           (select count(*) from stripe_events where status = 'pending'),
           (select count(*) from apalis.jobs
             where job_type <> 'slate.maintenance' and ",
        slate_workers::job_live!(),
        ")",
    ))
    .fetch_one(pool)
    .await?;
    let mut projection_lag = 0;
    for p in Projection::ASYNC {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from events e
              where (e.transaction_id, e.global_position) >
                    (coalesce((select last_transaction_id from projection_checkpoints where projection = $1), '0'::xid8),
                     coalesce((select last_position from projection_checkpoints where projection = $1), 0))
                and e.event_type = any($2)",
        )
        .bind(p.name())
        .bind(p.event_types())
        .fetch_one(pool)
        .await?;
        projection_lag += n;
    }
    Ok(Progress {
        unfinished,
        stripe_pending,
        live_jobs,
        projection_lag,
    })
}

/// Wait until nothing is queued or running, no Stripe event is pending, no
/// job is live (every queue's but the maintenance sweep's, which schedules
/// itself: what the check "no job pending, queued or running" counts),
/// every projection has caught up and every webhook delivery
/// was acknowledged. Returns the seconds it took, or None at the limit.
pub async fn drain(ctx: &Ctx, pool: &PgPool) -> Option<f64> {
    let started = Instant::now();
    let limit = ctx.plan.drain_limit;
    println!("\ndraining (at most {} s)", limit.as_secs());
    let mut last_print = Instant::now() - Duration::from_secs(60);
    loop {
        let all_up = ctx.supervisor.lock().expect("not poisoned").all_running();
        let webhooks_done = ctx.webhooks_done.load(Ordering::Relaxed);
        match progress(pool).await {
            Ok(p) if p.done() && webhooks_done && all_up => {
                let secs = started.elapsed().as_secs_f64();
                println!("  drained in {secs:.1} s");
                return Some(secs);
            }
            Ok(p) => {
                if last_print.elapsed() >= Duration::from_secs(5) {
                    println!(
                        "  [{:>5.0}s] generations queued/running {:>4}  stripe pending {:>3}  live jobs {:>4}  projection lag {:>5}  webhooks {}",
                        started.elapsed().as_secs_f64(),
                        p.unfinished,
                        p.stripe_pending,
                        p.live_jobs,
                        p.projection_lag,
                        if webhooks_done {
                            "all acknowledged"
                        } else {
                            "delivering"
                        }
                    );
                    last_print = Instant::now();
                }
            }
            Err(e) => println!("  drain: the database answered {e}"),
        }
        if started.elapsed() > limit {
            ctx.violation(format!(
                "the system did not drain within {} s",
                limit.as_secs()
            ));
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every invariant the soak checks (each name as `check_all` records it).
const INVARIANTS: &[&str] = &[
    "accepted generation recorded",
    "generation of the right account",
    "outcome possible for its scenario",
    "scenarios that can succeed mostly do (retries recover)",
    "no generation beyond the accepted ones (idempotency)",
    "accepted generation has its events",
    "exactly one outcome event per generation",
    "reservation captured or released exactly once",
    "captured iff succeeded, released iff failed/canceled",
    "captured = cost of the succeeded generations",
    "API status equals the database",
    "API balance equals the ledger",
    "succeeded output is in S3",
    "succeeded generation has an output URL",
    "generation finished (none queued/running)",
    "one job per generation, finished",
    "no job pending, queued or running",
    "no reservation left open",
    "nothing reserved at rest",
    "conservation per account",
    "debt = added − settled",
    "granted = every pack once",
    "revoked = every refund once",
    "every planned Stripe event acknowledged",
    "acknowledged webhook mirrored and processed",
    "delivery count >= acknowledged deliveries",
    "slate projections verify exits 0",
    "/readyz answered 503 during the PostgreSQL outages",
    "every queue's worker in every work process heartbeating",
    "idle processes stay idle (< 50 % CPU)",
    "no process crashed",
    "provider paid twice only for a killed worker's attempt",
];

/// One invariant, checked.
pub struct CheckRow {
    pub name: &'static str,
    pub checked: usize,
    pub failures: Vec<String>,
}

pub struct Report {
    pub checks: Vec<CheckRow>,
    pub drained_secs: Option<f64>,
    /// Scenario → outcome status → count.
    pub outcomes: BTreeMap<&'static str, BTreeMap<String, u64>>,
    pub failure_codes: BTreeMap<String, u64>,
    pub events_in_log: i64,
    pub stripe_events: usize,
    pub job_states: Vec<(String, String, i64)>,
}

struct CheckSet(Vec<CheckRow>);

impl CheckSet {
    fn row(&mut self, name: &'static str) -> &mut CheckRow {
        if let Some(i) = self.0.iter().position(|r| r.name == name) {
            return &mut self.0[i];
        }
        self.0.push(CheckRow {
            name,
            checked: 0,
            failures: Vec::new(),
        });
        self.0.last_mut().expect("just pushed")
    }
    fn pass(&mut self, name: &'static str) {
        self.row(name).checked += 1;
    }
    fn fail(&mut self, name: &'static str, why: String) {
        let r = self.row(name);
        r.checked += 1;
        r.failures.push(why);
    }
    fn expect(&mut self, name: &'static str, ok: bool, why: impl FnOnce() -> String) {
        if ok {
            self.pass(name)
        } else {
            self.fail(name, why())
        }
    }
}

#[derive(sqlx::FromRow)]
struct GenRow {
    generation_id: Uuid,
    account_id: Uuid,
    status: String,
    cost: i64,
    failure_code: Option<String>,
    output_key: Option<String>,
}

#[derive(sqlx::FromRow)]
struct EventCounts {
    generation_id: Option<String>,
    reserved: i64,
    captured: i64,
    released: i64,
    requested: i64,
    succeeded: i64,
    failed: i64,
    canceled: i64,
}

#[derive(sqlx::FromRow)]
struct CreditRow {
    account_id: Uuid,
    available: i64,
    reserved: i64,
    debt: i64,
    total_granted: i64,
    total_captured: i64,
    total_lapsed: i64,
    total_revoked: i64,
    total_debt_settled: i64,
    total_debt_added: i64,
}

pub async fn check(
    ctx: &Ctx,
    pool: &PgPool,
    config: &Config,
    drained_secs: Option<f64>,
    bin: &Path,
    paid_twice: &[(String, Instant)],
) -> Report {
    let mut set = CheckSet(Vec::new());
    let mut report = Report {
        checks: Vec::new(),
        drained_secs,
        outcomes: BTreeMap::new(),
        failure_codes: BTreeMap::new(),
        events_in_log: 0,
        stripe_events: 0,
        job_states: Vec::new(),
    };
    if let Err(e) = check_all(ctx, pool, config, bin, paid_twice, &mut set, &mut report).await {
        set.fail("checks ran", format!("{e:#}"));
    }
    // Most checks run once per item (accepted generation, Stripe event,
    // account, process): with no items a check would not appear at all, and
    // the soak would pass with one invariant fewer. Each must have checked
    // something.
    for name in INVARIANTS {
        if set.0.iter().all(|r| r.name != *name || r.checked == 0) {
            set.fail(name, "checked nothing: the soak did not exercise it".into());
        }
    }
    for r in &set.0 {
        for f in r.failures.iter().take(10) {
            ctx.violation(format!("{}: {f}", r.name));
        }
        if r.failures.len() > 10 {
            ctx.violation(format!("{}: … and {} more", r.name, r.failures.len() - 10));
        }
    }
    report.checks = set.0;
    report
}

async fn check_all(
    ctx: &Ctx,
    pool: &PgPool,
    config: &Config,
    bin: &Path,
    paid_twice: &[(String, Instant)],
    set: &mut CheckSet,
    report: &mut Report,
) -> anyhow::Result<()> {
    let (accepted, unresolved, acks) = {
        let s = ctx.stats();
        (
            s.accepted.clone(),
            s.unresolved.clone(),
            s.webhook_acks.clone(),
        )
    };
    let account_ids: Vec<Uuid> = ctx.accounts.iter().map(|a| a.id).collect();
    let account_index: HashMap<Uuid, usize> = account_ids
        .iter()
        .enumerate()
        .map(|(i, a)| (*a, i))
        .collect();

    // --- generations: each accepted one finished, exactly one outcome ---------
    let gens: Vec<GenRow> = sqlx::query_as(
        "select generation_id, account_id, status, cost, failure_code, output_key
           from generations where account_id = any($1)",
    )
    .bind(&account_ids)
    .fetch_all(pool)
    .await?;
    let by_id: HashMap<Uuid, &GenRow> = gens.iter().map(|g| (g.generation_id, g)).collect();
    for a in accepted.values() {
        match by_id.get(&a.id) {
            None => set.fail(
                "accepted generation recorded",
                format!("{} accepted (202) but not in generations", a.id),
            ),
            Some(g) => {
                set.pass("accepted generation recorded");
                set.expect(
                    "generation finished (none queued/running)",
                    matches!(g.status.as_str(), "succeeded" | "failed" | "canceled"),
                    || format!("{} is {}", g.generation_id, g.status),
                );
                set.expect(
                    "generation of the right account",
                    account_index.get(&g.account_id) == Some(&a.account),
                    || format!("{} belongs to {}", g.generation_id, g.account_id),
                );
                set.expect(
                    "outcome possible for its scenario",
                    g.status != "succeeded" || a.scenario.can_succeed(),
                    || format!("{} ({}) succeeded", g.generation_id, a.scenario.name()),
                );
                *report
                    .outcomes
                    .entry(a.scenario.name())
                    .or_default()
                    .entry(g.status.clone())
                    .or_default() += 1;
                if let Some(code) = &g.failure_code {
                    *report
                        .failure_codes
                        .entry(format!("{} {code}", g.status))
                        .or_default() += 1;
                }
            }
        }
    }
    // A scenario that can succeed mostly does: its failures are the faults'
    // (an outage outlasting the attempts), not its retry path. (Only a
    // success where none is possible was checked: with retries broken every
    // flaky or hanging-once generation would fail, be refunded, and pass.)
    for scenario in super::fake::Scenario::ALL {
        let Some(by_status) = report.outcomes.get(scenario.name()) else {
            continue;
        };
        let total: u64 = by_status.values().sum();
        if !scenario.can_succeed() || total < 4 {
            continue;
        }
        let succeeded = by_status.get("succeeded").copied().unwrap_or(0);
        set.expect(
            "scenarios that can succeed mostly do (retries recover)",
            succeeded * 2 >= total,
            || {
                format!(
                    "{}: {succeeded} of {total} succeeded ({by_status:?})",
                    scenario.name()
                )
            },
        );
    }

    // A generation nobody was answered 202 for is allowed only under a key
    // whose submission was given up (its 202 may have been lost on the way):
    // each generation's key is the one whose stored answer names it (written
    // in the submission's transaction), and a key has one stored answer.
    let keys: HashMap<Uuid, (Uuid, String)> = sqlx::query_as::<_, (Uuid, Uuid, String)>(
        "select (response->>'id')::uuid, account_id, key from idempotency_keys
          where account_id = any($1) and response->>'id' is not null",
    )
    .bind(&account_ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(id, account, key)| (id, (account, key)))
    .collect();
    let given_up: HashSet<(Uuid, &str)> = unresolved
        .iter()
        .map(|(a, k)| (account_ids[*a], k.as_str()))
        .collect();
    for g in gens
        .iter()
        .filter(|g| !accepted.contains_key(&g.generation_id))
    {
        let key = keys.get(&g.generation_id);
        set.expect(
            "no generation beyond the accepted ones (idempotency)",
            key.is_some_and(|(a, k)| given_up.contains(&(*a, k.as_str()))),
            || match key {
                Some((_, k)) => format!(
                    "{} was created under key {k}, whose submission was answered otherwise",
                    g.generation_id
                ),
                None => format!("{} has no key's answer naming it", g.generation_id),
            },
        );
    }
    if gens.iter().all(|g| accepted.contains_key(&g.generation_id)) {
        set.pass("no generation beyond the accepted ones (idempotency)");
    }

    let counts: Vec<EventCounts> = sqlx::query_as(
        "select payload->>'generation_id' as generation_id,
                count(*) filter (where event_type = 'CreditsReserved') as reserved,
                count(*) filter (where event_type = 'CreditsCaptured') as captured,
                count(*) filter (where event_type = 'CreditsReleased') as released,
                count(*) filter (where event_type = 'GenerationRequested') as requested,
                count(*) filter (where event_type = 'GenerationSucceeded') as succeeded,
                count(*) filter (where event_type = 'GenerationFailed') as failed,
                count(*) filter (where event_type = 'GenerationCanceled') as canceled
           from events where event_type = any($1) group by 1",
    )
    .bind(OUTCOMES)
    .fetch_all(pool)
    .await?;
    let mut seen = HashSet::new();
    for c in &counts {
        let id = c.generation_id.as_deref().unwrap_or("?");
        if let Ok(uuid) = id.parse::<Uuid>() {
            seen.insert(uuid);
        }
        set.expect(
            "reservation captured or released exactly once",
            c.reserved == 1 && c.captured + c.released == 1,
            || {
                format!(
                    "{id}: reserved {} captured {} released {}",
                    c.reserved, c.captured, c.released
                )
            },
        );
        set.expect(
            "exactly one outcome event per generation",
            c.requested == 1 && c.succeeded + c.failed + c.canceled == 1,
            || {
                format!(
                    "{id}: requested {} succeeded {} failed {} canceled {}",
                    c.requested, c.succeeded, c.failed, c.canceled
                )
            },
        );
        set.expect(
            "captured iff succeeded, released iff failed/canceled",
            c.captured == c.succeeded && c.released == c.failed + c.canceled,
            || {
                format!(
                    "{id}: captured {} released {} vs outcomes",
                    c.captured, c.released
                )
            },
        );
    }
    let open: i64 =
        sqlx::query_scalar("select count(*) from credit_reservations where status = 'reserved'")
            .fetch_one(pool)
            .await?;
    set.expect("no reservation left open", open == 0, || {
        format!("{open} reservations still reserved")
    });
    for a in accepted.values() {
        set.expect(
            "accepted generation has its events",
            seen.contains(&a.id),
            || format!("{} has no events", a.id),
        );
    }

    // --- the API agrees -----------------------------------------------------------
    let base = ctx.serves[0].clone();
    let views: Vec<(Uuid, Result<Value, String>)> =
        futures::stream::iter(accepted.values().cloned())
            .map(|a| {
                let (http, key, base) = (
                    ctx.http.clone(),
                    ctx.accounts[a.account].key.clone(),
                    base.clone(),
                );
                async move {
                    let r = http
                        .get(format!("{base}/v1/generations/{}", a.id))
                        .bearer_auth(key)
                        .send()
                        .await;
                    let v = match r {
                        Ok(r) if r.status().is_success() => {
                            r.json::<Value>().await.map_err(|e| e.to_string())
                        }
                        Ok(r) => Err(format!("HTTP {}", r.status())),
                        Err(e) => Err(e.to_string()),
                    };
                    (a.id, v)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
    let mut captured_by_api: HashMap<usize, i64> = HashMap::new();
    for (id, v) in views {
        match v {
            Ok(v) => {
                let db = by_id.get(&id).map(|g| g.status.as_str());
                set.expect(
                    "API status equals the database",
                    v["status"].as_str() == db,
                    || format!("{id}: API {:?}, database {db:?}", v["status"]),
                );
                if v["status"] == "succeeded" {
                    let account = accepted[&id].account;
                    *captured_by_api.entry(account).or_default() += v["cost"].as_i64().unwrap_or(0);
                    set.expect(
                        "succeeded generation has an output URL",
                        v["output"]["url"].is_string(),
                        || format!("{id}: no output URL"),
                    );
                }
            }
            Err(e) => set.fail("API status equals the database", format!("{id}: {e}")),
        }
    }

    // --- credits: conservation per account -----------------------------------------
    let credit_rows: Vec<CreditRow> = sqlx::query_as(
        "select account_id, available, reserved, debt, total_granted, total_captured,
                total_lapsed, total_revoked, total_debt_settled, total_debt_added
           from credit_accounts where account_id = any($1)",
    )
    .bind(&account_ids)
    .fetch_all(pool)
    .await?;
    let revoked: HashMap<Uuid, (i64, i64)> = sqlx::query_as::<_, (Uuid, i64, i64)>(
        "select account_id, coalesce(sum(amount), 0)::bigint, coalesce(sum(debt_added), 0)::bigint
           from credit_revocations where account_id = any($1) group by 1",
    )
    .bind(&account_ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(a, x, d)| (a, (x, d)))
    .collect();
    // Captures add debt too: held credits a revocation had claimed.
    let owed: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
        "select (e.payload->>'account_id')::uuid, sum((o->>'amount')::bigint)::bigint
           from events e, jsonb_array_elements(e.payload->'owed') o
          where e.event_type = 'CreditsCaptured' and e.payload ? 'owed'
            and (e.payload->>'account_id')::uuid = any($1)
          group by 1",
    )
    .bind(&account_ids)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let packs_of = |i: usize| if i == 0 { 1 } else { ctx.plan.packs_per_account } as i64;
    let refunds_of = |i: usize| (0..packs_of(i)).filter(|p| p % 3 == 1).count() as i64;
    for (i, account) in ctx.accounts.iter().enumerate() {
        let Some(c) = credit_rows.iter().find(|c| c.account_id == account.id) else {
            set.fail(
                "conservation per account",
                format!("{}: no credit account", account.id),
            );
            continue;
        };
        let sum = c.available
            + c.reserved
            + c.total_captured
            + c.total_lapsed
            + c.total_revoked
            + c.total_debt_settled;
        set.expect(
            "conservation per account",
            sum == c.total_granted,
            || {
                format!(
                    "{}: available {} + reserved {} + captured {} + lapsed {} + revoked {} + debt settled {} = {sum} ≠ granted {}",
                    account.id, c.available, c.reserved, c.total_captured, c.total_lapsed,
                    c.total_revoked, c.total_debt_settled, c.total_granted
                )
            },
        );
        set.expect(
            "granted = every pack once",
            c.total_granted == packs_of(i) * PACK_CREDITS,
            || {
                format!(
                    "{}: granted {} for {} packs",
                    account.id,
                    c.total_granted,
                    packs_of(i)
                )
            },
        );
        let (rev, revoked_debt) = revoked.get(&account.id).copied().unwrap_or((0, 0));
        let debt_added = revoked_debt + owed.get(&account.id).copied().unwrap_or(0);
        set.expect(
            "revoked = every refund once",
            rev == refunds_of(i) * REFUND_CREDITS,
            || {
                format!(
                    "{}: revoked {rev} for {} refunds",
                    account.id,
                    refunds_of(i)
                )
            },
        );
        set.expect(
            "debt = added − settled",
            c.debt == debt_added - c.total_debt_settled
                && c.total_debt_added == debt_added
                && c.debt >= 0,
            || {
                format!(
                    "{}: debt {} vs added {debt_added} (recorded {}) settled {}",
                    account.id, c.debt, c.total_debt_added, c.total_debt_settled
                )
            },
        );
        set.expect("nothing reserved at rest", c.reserved == 0, || {
            format!("{}: reserved {}", account.id, c.reserved)
        });
        let captured_expected: i64 = gens
            .iter()
            .filter(|g| g.account_id == account.id && g.status == "succeeded")
            .map(|g| g.cost)
            .sum();
        set.expect(
            "captured = cost of the succeeded generations",
            c.total_captured == captured_expected
                && captured_by_api.get(&i).copied().unwrap_or(0) == captured_expected,
            || {
                format!(
                    "{}: captured {} vs database {captured_expected} vs API {}",
                    account.id,
                    c.total_captured,
                    captured_by_api.get(&i).copied().unwrap_or(0)
                )
            },
        );
        let api = ctx
            .http
            .get(format!("{base}/v1/credits"))
            .bearer_auth(&account.key)
            .send()
            .await;
        match api {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.unwrap_or(Value::Null);
                set.expect(
                    "API balance equals the ledger",
                    v["available"].as_i64() == Some(c.available)
                        && v["reserved"].as_i64() == Some(c.reserved)
                        && v["debt"].as_i64() == Some(c.debt),
                    || {
                        format!(
                            "{}: API {v} vs available {} reserved {} debt {}",
                            account.id, c.available, c.reserved, c.debt
                        )
                    },
                );
            }
            other => set.fail(
                "API balance equals the ledger",
                format!("{}: {other:?}", account.id),
            ),
        }
    }

    // --- jobs: none lost, none left ------------------------------------------------------
    let jobs: Vec<(Option<String>, Option<String>, String, i32)> = sqlx::query_as(
        "select convert_from(job, 'UTF8')::jsonb->>'generation_id', idempotency_key,
                status::text, attempts
           from apalis.jobs where job_type = 'slate.generations'",
    )
    .fetch_all(pool)
    .await?;
    let mut job_of: HashMap<Uuid, Vec<(String, i32)>> = HashMap::new();
    for (g, key, status, attempts) in jobs {
        if let Some(g) = g.and_then(|g| g.parse().ok())
            // Not the job that stops a lost generation's provider job.
            && key != Some(slate_workers::generations::stop_job_key(g))
        {
            job_of.entry(g).or_default().push((status, attempts));
        }
    }
    for a in accepted.values() {
        match job_of.get(&a.id).map(Vec::as_slice) {
            Some([(status, _)]) => set.expect(
                "one job per generation, finished",
                !matches!(status.as_str(), "Pending" | "Queued" | "Running"),
                || format!("{}: job {status}", a.id),
            ),
            Some(many) => set.fail(
                "one job per generation, finished",
                format!("{}: {} jobs", a.id, many.len()),
            ),
            None => set.fail(
                "one job per generation, finished",
                format!("{}: no job", a.id),
            ),
        }
    }
    report.job_states = sqlx::query_as(
        "select job_type, status::text, count(*) from apalis.jobs group by 1, 2 order by 1, 2",
    )
    .fetch_all(pool)
    .await?;
    let live: i64 = sqlx::query_scalar(concat!(
        "select count(*) from apalis.jobs
          where job_type <> 'slate.maintenance' and ",
        slate_workers::job_live!(),
    ))
    .fetch_one(pool)
    .await?;
    set.expect("no job pending, queued or running", live == 0, || {
        format!("{live} live jobs")
    });

    // --- webhooks: every acknowledged one mirrored and processed --------------------------
    let mirror: HashMap<String, (String, i32)> = sqlx::query_as::<_, (String, String, i32)>(
        "select stripe_event_id, status, delivery_count from stripe_events",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(id, s, n)| (id, (s, n)))
    .collect();
    report.stripe_events = mirror.len();
    for (id, acked) in &acks {
        match mirror.get(id) {
            None => set.fail(
                "acknowledged webhook mirrored and processed",
                format!("{id}: not in the mirror"),
            ),
            Some((status, deliveries)) => {
                set.expect(
                    "acknowledged webhook mirrored and processed",
                    (status == "processed" && !id.ends_with("_x_unknown"))
                        || (status == "ignored" && id.ends_with("_x_unknown")),
                    || format!("{id}: {status}"),
                );
                set.expect(
                    "delivery count >= acknowledged deliveries",
                    *deliveries as u32 >= *acked,
                    || format!("{id}: {deliveries} recorded, {acked} acknowledged"),
                );
            }
        }
    }
    let planned = ctx.accounts.len() as i64
        + (0..ctx.accounts.len())
            .map(|i| packs_of(i) + refunds_of(i))
            .sum::<i64>();
    set.expect(
        "every planned Stripe event acknowledged",
        acks.len() as i64 == planned,
        || format!("{} of {planned} acknowledged", acks.len()),
    );

    // --- S3: every output stored --------------------------------------------------------------
    let storage = slate_workers::storage::Storage::new(&config.storage());
    let mut stored = HashSet::new();
    for a in &account_ids {
        for k in storage
            .list_prefix(&slate_workers::storage::account_prefix(*a))
            .await?
        {
            stored.insert(k);
        }
    }
    for g in gens.iter().filter(|g| g.status == "succeeded") {
        let key = g.output_key.clone().unwrap_or_default();
        set.expect("succeeded output is in S3", stored.contains(&key), || {
            format!("{}: {key} missing", g.generation_id)
        });
    }

    report.events_in_log = sqlx::query_scalar("select count(*) from events")
        .fetch_one(pool)
        .await?;

    // --- the projections match the log -----------------------------------------------------------
    let bin = bin.to_owned();
    let verify = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["projections", "verify"])
            .output()
    })
    .await?;
    match verify {
        Ok(out) if out.status.success() => set.pass("slate projections verify exits 0"),
        Ok(out) => set.fail(
            "slate projections verify exits 0",
            format!(
                "exit {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.contains("DIFFERENT") || l.starts_with("    "))
                    .collect::<Vec<_>>()
                    .join(" | ")
            ),
        ),
        Err(e) => set.fail("slate projections verify exits 0", e.to_string()),
    }

    // --- readiness said so while PostgreSQL was down ------------------------------------
    let outage_503: u64 = ctx
        .stats()
        .outage_responses
        .iter()
        .filter(|((class, label), _)| *class == "readyz" && label.starts_with("503"))
        .map(|(_, n)| n)
        .sum();
    set.expect(
        "/readyz answered 503 during the PostgreSQL outages",
        outage_503 as usize >= ctx.plan.pg_restarts.len(),
        || {
            format!(
                "{outage_503} readiness 503s during {} outages",
                ctx.plan.pg_restarts.len()
            )
        },
    );

    // --- every queue of every worker process is alive (heartbeating) ------------------
    let workers = ctx
        .supervisor
        .lock()
        .expect("not poisoned")
        .running(super::procs::Kind::Work);
    for (name, pid) in &workers {
        // The process's name is `<host>-<pid>-<random>`; only the newest
        // process with this pid counts (pids are reused). Then the
        // watchdog's own look (`runtime::silent_queue`): each queue, and
        // each of its workers by name (one of several generation fetchers
        // falling silent is the failure this is for, and a fresh beat of a
        // sibling hid it).
        let process: Option<String> = sqlx::query_scalar(
            "select substring(id from '^(.*-' || $1 || '-[0-9a-f]{8})[.]') as process
               from apalis.workers
              where id like '%-' || $1 || '-%'
                and substring(id from '^(.*-' || $1 || '-[0-9a-f]{8})[.]') is not null
              order by last_seen desc limit 1",
        )
        .bind(pid.to_string())
        .fetch_optional(pool)
        .await?;
        let silent = match &process {
            None => Some("every queue (none registered)".to_owned()),
            Some(process) => {
                slate_workers::runtime::silent_queue(pool, process, Duration::from_secs(30), &[])
                    .await?
            }
        };
        // On failure, the queue's workers and their last beats.
        let beats: Vec<(String, f64)> = match (&process, &silent) {
            (Some(process), Some(queue)) => sqlx::query_as(
                "select id, extract(epoch from now() - last_seen)::float8
                   from apalis.workers
                  where worker_type = $1 and starts_with(id, $2 || '.')
                  order by id",
            )
            .bind(queue)
            .bind(process)
            .fetch_all(pool)
            .await
            .unwrap_or_default(),
            _ => Vec::new(),
        };
        set.expect(
            "every queue's worker in every work process heartbeating",
            silent.is_none(),
            || {
                let beats: Vec<String> = beats
                    .iter()
                    .map(|(id, ago)| format!("{id} beat {ago:.0} s ago"))
                    .collect();
                format!(
                    "{name} (pid {pid}): {} silent for 30 s ({})",
                    silent.as_deref().unwrap_or_default(),
                    beats.join("; ")
                )
            },
        );
    }

    // --- idle processes are idle (no busy loop left behind by a fault) ----------------
    let pids: Vec<(String, u32)> = {
        let sup = ctx.supervisor.lock().expect("not poisoned");
        let mut v = sup.running(super::procs::Kind::Work);
        v.extend(sup.running(super::procs::Kind::Serve));
        v
    };
    let cpu = |pid: u32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    let first: Vec<Option<u64>> = pids.iter().map(|(_, p)| cpu(*p)).collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    for ((name, pid), a) in pids.iter().zip(first) {
        // Clock ticks (100 per second): more than half a core for 5 s.
        if let (Some(a), Some(b)) = (a, cpu(*pid)) {
            set.expect("idle processes stay idle (< 50 % CPU)", b - a < 250, || {
                format!(
                    "{name} (pid {pid}) used {} % of a core while idle",
                    (b - a) / 5
                )
            });
        }
    }

    // --- processes ---------------------------------------------------------------------------------
    let exits = ctx.supervisor.lock().expect("not poisoned").exits.clone();
    for e in &exits {
        // Only the watchdog stops a process on its own. (A process started
        // while PostgreSQL is down waits for it: `db::connect_waiting`.)
        set.expect("no process crashed", e.watchdog(), || {
            format!(
                "{} exited ({}) after {:.1} s",
                e.name,
                e.status,
                e.uptime.as_secs_f64()
            )
        });
    }
    set.pass("no process crashed");

    // --- the provider paid twice only where an attempt was killed ----------------------
    // Fal has no idempotency key: a second attempt submits again only when
    // the first one's handle was never recorded, which a SIGKILL between
    // the provider's answer and the record explains. An attempt keeps
    // trying to record its handle through an outage for a minute
    // (`DB_PATIENCE`, in pauses of up to 5 s), so an outage explains it
    // too, but only one that began by the time the provider first accepted
    // the generation (6 s after, at most: its first try may wait 5 s for a
    // pool connection) and lasted nearly that long past it.
    let (killed, outages) = {
        let s = ctx.stats();
        (s.killed_generations.clone(), s.pg_outages.clone())
    };
    for (prompt, first) in paid_twice {
        // Its generation by the key in its prompt: an accepted one, or one
        // a given-up submission created (through its idempotency key).
        let generation = accepted
            .values()
            .find(|a| prompt.ends_with(&format!(" {}", a.key)))
            .map(|a| a.id)
            .or_else(|| {
                keys.iter()
                    .find(|(_, (_, key))| prompt.ends_with(&format!(" {key}")))
                    .map(|(id, _)| *id)
            });
        // The last try of the minute starts more than 50 s after the first
        // (it gives up once a pause would end past the minute; a try that
        // cannot connect waits up to 5 s for a connection).
        let gives_up = slate_workers::generations::DB_PATIENCE - Duration::from_secs(10);
        let outlasted = outages
            .iter()
            .any(|&(down, up)| down <= *first + Duration::from_secs(6) && up >= *first + gives_up);
        set.expect(
            "provider paid twice only for a killed worker's attempt",
            outlasted || generation.is_some_and(|g| killed.contains(&g)),
            || match generation {
                Some(g) => format!(
                    "{g}: accepted twice by the provider, and no worker was killed holding its job \
                     nor did PostgreSQL stay down through its first attempt's record"
                ),
                None => "a prompt accepted twice names no generation".to_owned(),
            },
        );
    }
    set.pass("provider paid twice only for a killed worker's attempt");
    Ok(())
}

pub fn summary(ctx: &Ctx, report: &Report, fake: &FakeStats, soak_secs: f64) {
    let s = ctx.stats();
    let sup = ctx.supervisor.lock().expect("not poisoned");
    println!("\n=== chaos soak ({:?}, seed {}) ===", ctx.mode, ctx.seed);
    println!(
        "soak {:.0} s, drain {}",
        soak_secs,
        match report.drained_secs {
            Some(d) => format!("{d:.1} s"),
            None => "did not finish".into(),
        }
    );
    println!("\nfaults");
    println!(
        "  worker SIGKILLs            {:>6}  (holding {} queued/running jobs between them)",
        sup.kills, s.jobs_held_at_kill
    );
    println!("  process starts             {:>6}", sup.starts());
    println!(
        "  exits nobody asked for     {:>6}{}",
        sup.exits.len(),
        if sup.exits.is_empty() {
            String::new()
        } else {
            format!(
                "  ({})",
                sup.exits
                    .iter()
                    .map(|e| format!(
                        "{} after {:.1} s{}",
                        e.name,
                        e.uptime.as_secs_f64(),
                        if e.during_pg_outage {
                            " during the PostgreSQL outage"
                        } else {
                            ""
                        }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    let stopped: Vec<String> = sup
        .exits
        .iter()
        .filter(|e| e.watchdog())
        .filter_map(|e| {
            let queue = e.silent_queue.as_deref()?;
            Some(format!(
                "{} after {:.1} s: {queue}",
                e.name,
                e.uptime.as_secs_f64()
            ))
        })
        .collect();
    println!(
        "  restarts by the work watchdog {:>3}  (a job worker had gone silent{})",
        stopped.len(),
        if stopped.is_empty() {
            String::new()
        } else {
            format!("; {}", stopped.join(", "))
        }
    );
    let n = |k: &[(std::time::Duration, std::time::Duration)]| k.len();
    println!(
        "  PostgreSQL restarts        {:>6}",
        n(&ctx.plan.pg_restarts)
    );
    println!(
        "  Redis restarts             {:>6}",
        n(&ctx.plan.redis_restarts)
    );
    println!("  S3 stops                   {:>6}", n(&ctx.plan.s3_stops));
    println!("  provider calls that hung   {:>6}", fake.hangs);
    println!(
        "  workers resuming by themselves after a PostgreSQL restart {:>3}",
        s.workers_resumed
    );
    for (what, secs) in &s.recoveries {
        println!("  ready again after {what:<10} {secs:>5.1} s");
    }
    println!("\nload");
    println!(
        "  submissions                {:>6}  (retries {}, 402 insufficient {}, unresolved {})",
        s.submissions,
        s.submit_retries,
        s.insufficient,
        s.unresolved.len()
    );
    println!("  generations accepted       {:>6}", s.accepted.len());
    println!(
        "  webhook deliveries         {:>6}  ({} distinct events acknowledged, {} in the mirror)",
        s.webhook_deliveries,
        s.webhook_acks.len(),
        report.stripe_events
    );
    println!("  reads                      {:>6}", s.reads);
    println!("  events in the log          {:>6}", report.events_in_log);
    println!(
        "  fake provider              submits {}, status polls {}, results {}, downloads {}, cancels {}, accepted twice {}",
        fake.submits,
        fake.status_polls,
        fake.results,
        fake.downloads,
        fake.cancels,
        fake.accepted_twice
    );
    if !fake.twice.is_empty() {
        // A generation the provider accepted twice was paid for twice (the
        // user was billed once): the second attempt did not know the first
        // one's handle.
        let ids: Vec<String> = fake
            .twice
            .iter()
            .take(10)
            .map(|(prompt, _)| {
                s.accepted
                    .values()
                    .find(|a| prompt.ends_with(&format!(" {}", a.key)))
                    .map(|a| format!("{} ({})", a.id, a.scenario.name()))
                    .unwrap_or_else(|| prompt.clone())
            })
            .collect();
        println!("  accepted twice by the provider: {}", ids.join(", "));
    }
    println!("\nanswers (class, status → count; * = while PostgreSQL was down)");
    for ((class, label), count) in &s.responses {
        let outage = s
            .outage_responses
            .get(&(*class, label.clone()))
            .copied()
            .unwrap_or(0);
        println!(
            "  {class:<8} {label:<36} {count:>7}{}",
            if outage > 0 {
                format!("  (*{outage})")
            } else {
                String::new()
            }
        );
    }
    println!("\ngenerations by scenario → outcome");
    for scenario in Scenario::ALL {
        if let Some(o) = report.outcomes.get(scenario.name()) {
            let parts: Vec<String> = o.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("  {:<18} {}", scenario.name(), parts.join(", "));
        }
    }
    if !report.failure_codes.is_empty() {
        let parts: Vec<String> = report
            .failure_codes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        println!("  reasons: {}", parts.join(", "));
    }
    println!("\njobs (queue, status → count)");
    for (q, st, c) in &report.job_states {
        println!("  {q:<20} {st:<8} {c:>6}");
    }
    println!("\ninvariants");
    let mut passed = 0;
    for r in &report.checks {
        let ok = r.failures.is_empty();
        if ok {
            passed += 1;
        }
        println!(
            "  {:<4} {:<56} {:>6} checked{}",
            if ok { "ok" } else { "FAIL" },
            r.name,
            r.checked,
            if ok {
                String::new()
            } else {
                format!(", {} failed", r.failures.len())
            }
        );
    }
    println!("  {passed} of {} invariants held", report.checks.len());
    if ctx.mode == Mode::Long || !s.timeline.is_empty() {
        println!("\ntimeline");
        for (t, what) in &s.timeline {
            println!("  {t:>7.1}s  {what}");
        }
    }
}
