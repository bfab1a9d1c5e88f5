//! The parts of `slate bench` that need a big log or a big audit trail, and
//! the child processes:
//!
//! 5. projection rebuild speed (the audit projection over N events);
//! 6. append p50/p99 on an (almost) empty log and at N events;
//!    6b. an idle projector's checkpoint moved over that log's events of
//!    other types, and an empty batch read before and after;
//!    6c. an account's events read for its export from that log;
//! 7. peak RSS of `slate serve` and `slate work`, idle and under load;
//! 8. staff audit queries over N entries, first page and deep cursor;
//! 9. pickup latency from a submission's commit to its worker starting it;
//! 10. `/metrics` scrapes over a big Stripe mirror, a full queue table and
//!     many finished generations, before and after the maintenance sweep
//!     folds them.
//!
//! Big tables are filled with `generate_series` (shaped like the real rows),
//! not through the API: the point is to measure reads and appends at size.

use std::time::{Duration, Instant};

use serde::Serialize;
use slate_events::Metadata;
use slate_events::catalog::{DomainEvent, StaffRead};
use slate_events::projections::{self, Projection};
use slate_events::store::{self, ExpectedVersion, NewEvent};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub rebuild_events: usize,
    pub log_events: usize,
    pub audit_entries: usize,
    /// Samples per latency figure.
    pub samples: usize,
    /// Jobs timed one by one for the pickup latency (each waits for the last).
    pub pickup_samples: usize,
    /// Processed Stripe events in the mirror for the scrape measurement.
    pub stripe_events: usize,
    /// Done jobs in the queue's table for the scrape measurement (what the
    /// retention keeps: finished over the last 7 days).
    pub finished_jobs: usize,
    /// Finished generations for the scrape measurement (kept for good:
    /// finished over the last 30 days here).
    pub finished_generations: usize,
    /// Scrapes timed before and after the fold (each reads the mirror).
    pub scrape_samples: usize,
    /// Purges timed before the mirror's ids are written (each reads it
    /// whole).
    pub purge_scan_samples: usize,
    /// Credit buckets of other accounts for part 12's balance reads.
    pub credit_buckets: usize,
}

impl ScaleOptions {
    pub fn quick() -> Self {
        Self {
            rebuild_events: 20_000,
            log_events: 50_000,
            audit_entries: 50_000,
            samples: 100,
            pickup_samples: 30,
            stripe_events: 20_000,
            finished_jobs: 20_000,
            finished_generations: 20_000,
            scrape_samples: 10,
            purge_scan_samples: 3,
            credit_buckets: 20_000,
        }
    }
}

impl Default for ScaleOptions {
    fn default() -> Self {
        Self {
            rebuild_events: 1_000_000,
            log_events: 10_000_000,
            audit_entries: 10_000_000,
            samples: 500,
            pickup_samples: 200,
            stripe_events: 1_000_000,
            finished_jobs: 1_000_000,
            finished_generations: 1_000_000,
            scrape_samples: 20,
            purge_scan_samples: 3,
            credit_buckets: 1_000_000,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub fn percentiles(mut ms: Vec<f64>) -> Percentiles {
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if ms.is_empty() {
            0.0
        } else {
            ms[((ms.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    Percentiles {
        samples: ms.len(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

#[derive(Debug, Serialize)]
pub struct Rebuild {
    pub projection: &'static str,
    pub events: u64,
    pub seconds: f64,
    pub per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct AppendGrowth {
    pub small_log_events: i64,
    pub small: Percentiles,
    pub big_log_events: i64,
    pub big: Percentiles,
}

#[derive(Debug, Serialize)]
pub struct AuditQuery {
    pub filter: &'static str,
    pub first_page: Percentiles,
    /// Rows a query returned, on average (at most 50).
    pub first_page_rows: f64,
    pub deep_cursor: Percentiles,
    pub deep_cursor_rows: f64,
}

fn millis(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Sequential single-event appends, each to a new stream, each its own
/// transaction: latency (after a few unmeasured ones).
pub async fn append_latency(pool: &PgPool, samples: usize) -> anyhow::Result<Percentiles> {
    let mut conn = pool.acquire().await?;
    // Unmeasured first: a connection's first statements load its caches and
    // plans, and right after a checkpoint (the big log is measured after
    // one) each page's first change writes a full-page image to the WAL.
    let warm_up = (samples / 10).max(20);
    let mut ms = Vec::with_capacity(samples);
    for i in 0..warm_up + samples {
        let event = NewEvent::new(
            DomainEvent::StaffRead(StaffRead {
                staff_id: Uuid::nil(),
                account_id: Uuid::now_v7(),
                what: "bench".into(),
            }),
            Metadata::system(),
        );
        let t = Instant::now();
        store::append(
            &mut conn,
            &format!("bench-latency-{}", event.event_id),
            ExpectedVersion::NoStream,
            &[event],
        )
        .await?;
        if i >= warm_up {
            ms.push(millis(t));
        }
    }
    Ok(percentiles(ms))
}

/// The events in the log, counted: the highest position overstates it by
/// every value an append used up and did not keep (a rolled-back or raced
/// append, a duplicate tried). An index-only count once the log is
/// vacuumed (under a second at 10 M, after part 6's `settle`); a scan of
/// the table before.
pub async fn log_size(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("select count(*) from events")
        .fetch_one(pool)
        .await?)
}

/// Add `n` `StaffRead` events (one stream each), in chunks.
pub async fn fill_log(pool: &PgPool, n: usize, tag: &str) -> anyhow::Result<()> {
    let metadata = Metadata::system().to_json();
    let mut done = 0usize;
    while done < n {
        let chunk = (n - done).min(200_000);
        sqlx::query(
            "insert into events (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata)
             select gen_random_uuid(), $3 || '-' || ($1 + i), 1, 'StaffRead', 1,
                    jsonb_build_object('staff_id', '00000000-0000-0000-0000-000000000000',
                                       'account_id', lpad(to_hex(($1 + i) % 10000), 32, '0')::uuid,
                                       'what', 'bench'),
                    $4
               from generate_series(1, $2) i",
        )
        .bind(done as i64)
        .bind(chunk as i64)
        .bind(tag)
        .bind(&metadata)
        .execute(pool)
        .await?;
        done += chunk;
    }
    sqlx::query("analyze events").execute(pool).await?;
    Ok(())
}

/// After a bulk fill, bring the database to the steady state of a log that
/// grew over months: vacuumed (the visibility map set, so autovacuum's
/// insert-triggered pass over millions of fresh rows is not running during
/// the measurement), analyzed, and checkpointed (the fill's dirty pages
/// written out). Without it the "big log" latency measured the fill's
/// aftermath — autovacuum and the checkpointer on the same two cores — not
/// the cost of appending to a big log.
pub async fn settle(pool: &PgPool) -> anyhow::Result<()> {
    settle_table(pool, "events").await
}

/// [`settle`] for `table` (one of the bench's own names, never input).
pub async fn settle_table(pool: &PgPool, table: &'static str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!("vacuum (analyze) {table}")))
        .execute(pool)
        .await?;
    // CHECKPOINT needs superuser or pg_checkpoint; without it, vacuum alone.
    let _ = sqlx::query("checkpoint").execute(pool).await;
    // An autovacuum worker that started before ours finishes first.
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let busy: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
              where backend_type = 'autovacuum worker' and datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Rebuild the audit projection (one entry per event) from the whole log.
pub async fn rebuild_speed(pool: &PgPool, events: usize) -> anyhow::Result<Rebuild> {
    fill_log(pool, events, "bench-rebuild").await?;
    let t = Instant::now();
    let n = projections::rebuild(pool, Projection::AuditLog).await?;
    let seconds = t.elapsed().as_secs_f64();
    Ok(Rebuild {
        projection: Projection::AuditLog.name(),
        events: n,
        seconds,
        per_second: n as f64 / seconds,
    })
}

/// How an idle projector's checkpoint catches up with a log of other
/// types' events ([`projections::skip_ahead`]): the credit ledger, whose
/// events the big log of part 6 holds none of after part 4's.
#[derive(Debug, Serialize)]
pub struct Skip {
    pub projection: &'static str,
    /// Empty polls from the checkpoint left where its last event of its own
    /// types was.
    pub before: EmptyPolls,
    pub events_passed: i64,
    pub seconds: f64,
    pub per_second: f64,
    /// The same after the skip.
    pub after: EmptyPolls,
}

/// Part 6c: accounts' events read as their export reads them
/// ([`slate_events::accounts::export_events_page`], pages of 500), from the
/// big log of part 6, whose events name 10,000 accounts ([`fill_log`]).
#[derive(Debug, Serialize)]
pub struct ExportPages {
    pub log_events: i64,
    /// The accounts read, and their events on average.
    pub accounts: usize,
    pub events_per_account: f64,
    /// The first page of an account.
    pub first_page: Percentiles,
    /// All of an account's pages, the last (empty) one included.
    pub all_pages: Percentiles,
}

pub async fn export_pages(pool: &PgPool, samples: usize) -> anyhow::Result<ExportPages> {
    let mut conn = pool.acquire().await?;
    let mut keyring = slate_events::vault::Keyring::default();
    let (mut first_page, mut all_pages, mut events) = (Vec::new(), Vec::new(), 0usize);
    for i in 0..samples {
        // Spread over the 10,000 accounts; a new one each time.
        let account = Uuid::from_u128((i as u128 * 7_919) % 10_000);
        let t = Instant::now();
        let mut after = 0;
        loop {
            let page = slate_events::accounts::export_events_page(
                &mut conn,
                &mut keyring,
                account,
                after,
                500,
            )
            .await?;
            if after == 0 {
                first_page.push(millis(t));
            }
            let Some(last) = page.last() else { break };
            after = last["position"].as_i64().unwrap_or(i64::MAX);
            events += page.len();
        }
        all_pages.push(millis(t));
    }
    Ok(ExportPages {
        log_events: log_size(pool).await?,
        accounts: samples,
        events_per_account: events as f64 / samples.max(1) as f64,
        first_page: percentiles(first_page),
        all_pages: percentiles(all_pages),
    })
}

/// A caught-up projection's empty polls, [`EMPTY_BATCH_SAMPLES`] of each.
#[derive(Debug, Serialize)]
pub struct EmptyPolls {
    /// A batch as a poll ran it until the eighteenth session: its whole
    /// transaction (checkpoint lock, read, commit).
    pub batch: Percentiles,
    /// Its read alone ([`projections::batch_statement`]).
    pub read: Percentiles,
    /// A poll as the leader runs it now: the look first
    /// ([`projections::poll`]), which finds nothing.
    pub poll: Percentiles,
    /// WAL written per empty batch and per empty poll (the server's insert
    /// position before and after the samples, nothing else running).
    pub batch_wal_bytes: f64,
    pub poll_wal_bytes: f64,
}

/// Empty batches sampled per figure of [`Skip`].
const EMPTY_BATCH_SAMPLES: usize = 21;

pub async fn skip_speed(pool: &PgPool) -> anyhow::Result<Skip> {
    let p = Projection::CreditLedger;
    projections::catch_up(pool, p).await?;
    let before = empty_polls(pool, p).await?;
    let t = Instant::now();
    let mut events_passed = 0;
    loop {
        let step = projections::skip_ahead(pool, p).await?;
        events_passed += step;
        if step < projections::SKIP_WALK {
            break;
        }
    }
    let seconds = t.elapsed().as_secs_f64();
    let after = empty_polls(pool, p).await?;
    Ok(Skip {
        projection: p.name(),
        before,
        events_passed,
        seconds,
        per_second: events_passed as f64 / seconds.max(f64::EPSILON),
        after,
    })
}

async fn empty_polls(pool: &PgPool, p: Projection) -> anyhow::Result<EmptyPolls> {
    let mut conn = pool.acquire().await?;
    let wal = "select pg_current_wal_insert_lsn()::text";
    let (mut batches, mut reads, mut polls) = (Vec::new(), Vec::new(), Vec::new());
    let start: String = sqlx::query_scalar(wal).fetch_one(&mut *conn).await?;
    for _ in 0..EMPTY_BATCH_SAMPLES {
        let t = Instant::now();
        anyhow::ensure!(projections::run_batch(pool, p, 500).await? == 0);
        batches.push(millis(t));
    }
    let middle: String = sqlx::query_scalar(wal).fetch_one(&mut *conn).await?;
    for _ in 0..EMPTY_BATCH_SAMPLES {
        let t = Instant::now();
        anyhow::ensure!(projections::poll(pool, p, 500).await? == 0);
        polls.push(millis(t));
    }
    let end: String = sqlx::query_scalar(wal).fetch_one(&mut *conn).await?;
    for _ in 0..EMPTY_BATCH_SAMPLES {
        let t = Instant::now();
        let rows = sqlx::query(sqlx::AssertSqlSafe(projections::batch_statement()))
            .bind(p.name())
            .bind(p.event_types())
            .bind(500i64)
            .fetch_all(&mut *conn)
            .await?;
        anyhow::ensure!(rows.is_empty());
        reads.push(millis(t));
    }
    let (batch_wal, poll_wal): (f64, f64) = sqlx::query_as(
        "select pg_wal_lsn_diff($2::pg_lsn, $1::pg_lsn)::float8,
                pg_wal_lsn_diff($3::pg_lsn, $2::pg_lsn)::float8",
    )
    .bind(&start)
    .bind(&middle)
    .bind(&end)
    .fetch_one(&mut *conn)
    .await?;
    let n = EMPTY_BATCH_SAMPLES as f64;
    Ok(EmptyPolls {
        batch: percentiles(batches),
        read: percentiles(reads),
        poll: percentiles(polls),
        batch_wal_bytes: batch_wal / n,
        poll_wal_bytes: poll_wal / n,
    })
}

/// What `fill_audit` wrote: rows numbered `first..=last` (row `g` has
/// position `FILL_BASE + g`), oldest first, spread evenly over 18 months.
#[derive(Debug, Serialize)]
pub struct AuditFill {
    /// Every entry in the table, the projection's own included.
    pub entries: i64,
    pub filled: i64,
    first: i64,
    last: i64,
    first_seq: i64,
    last_seq: i64,
    oldest: chrono::DateTime<chrono::Utc>,
    newest: chrono::DateTime<chrono::Utc>,
}

impl AuditFill {
    /// The filled row a fraction `f` (0 oldest, 1 newest) of the way.
    fn row(&self, f: f64) -> i64 {
        self.first + ((self.last - self.first) as f64 * f) as i64
    }
    fn seq(&self, f: f64) -> i64 {
        self.first_seq + ((self.last_seq - self.first_seq) as f64 * f) as i64
    }
    fn at(&self, f: f64) -> chrono::DateTime<chrono::Utc> {
        let span = (self.newest - self.oldest).num_milliseconds() as f64;
        self.oldest + chrono::Duration::milliseconds((span * f) as i64)
    }
}

/// Filled rows' positions start above any event's.
const FILL_BASE: i64 = 1_000_000_000_000;

/// Fill `audit_entries` up to `n` rows shaped like real ones (and with at
/// least `n / 2` of its own, so that a quick run's queries find them):
/// 10,000 accounts, 1,000 actors, a request id per three entries, 18 months
/// of timestamps, two actions of one family and a rare one (one entry in
/// 100,000). Rows are numbered across chunks, so each of those is
/// spread over the whole fill.
pub async fn fill_audit(pool: &PgPool, n: usize) -> anyhow::Result<AuditFill> {
    let have: i64 = sqlx::query_scalar("select count(*) from audit_entries")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(n > 0, "--audit-entries must be positive");
    let fill = (n as i64 - have).max(n as i64 / 2).max(1);
    let first = n as i64 - fill + 1;
    let mut done = 0;
    while done < fill {
        let chunk = (fill - done).min(250_000);
        sqlx::query(
            "insert into audit_entries (position, event_id, at, actor_kind, actor_id, action,
                                        account_id, targets, outcome, request_id)
             select $4 + g, gen_random_uuid(),
                    now() - make_interval(secs => (($3 - g) * 47304000.0 / $3)),
                    'user', 'actor-' || (g % 1000),
                    case when g % 100000 = 0 then 'key.revoked'
                         when g % 2 = 0 then 'generation.requested'
                         else 'generation.succeeded' end,
                    lpad(to_hex(g % 10000), 32, '0')::uuid,
                    jsonb_build_object('generation', md5(g::text)),
                    'ok', 'req-' || (g / 3)
               from (select $1 + i as g from generate_series(0, $2 - 1) i) rows",
        )
        .bind(first + done)
        .bind(chunk)
        .bind(n as i64)
        .bind(FILL_BASE)
        .execute(pool)
        .await?;
        done += chunk;
    }
    // Vacuumed and checkpointed as a table that grew over months is: the
    // thirty-eighth session's full run read one-day windows at p99 153 ms
    // (deep cursor p50 68 ms) against 16 ms (12 ms) with part 8 alone,
    // most likely beside autovacuum's pass over the 8.6 M fresh rows.
    settle_table(pool, "audit_entries").await?;
    let last = first + fill - 1;
    let (entries, first_seq, last_seq, oldest, newest): (
        i64,
        i64,
        i64,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as(
        "select (select count(*) from audit_entries),
                (select seq from audit_entries where position = $1),
                (select seq from audit_entries where position = $2),
                (select at from audit_entries where position = $1),
                (select at from audit_entries where position = $2)",
    )
    .bind(FILL_BASE + first)
    .bind(FILL_BASE + last)
    .fetch_one(pool)
    .await?;
    Ok(AuditFill {
        entries,
        filled: fill,
        first,
        last,
        first_seq,
        last_seq,
        oldest,
        newest,
    })
}

/// The staff queries `/admin/audit` runs (every field shown, the request's
/// origin opened; the console's tables leave it out), p50/p99, for the
/// newest page and for a page deep in history: the cursor a tenth of the way
/// into the filled rows (nine tenths of them newer), each filter's value
/// chosen among the rows older than it. Each query's rows are counted, so a
/// filter that finds nothing shows.
pub async fn audit_queries(
    pool: &PgPool,
    fill: &AuditFill,
    samples: usize,
) -> anyhow::Result<Vec<AuditQuery>> {
    use crate::audit::{Filter, Shows, query};
    const DEEP: f64 = 0.1;
    // Sample `i`'s place among the rows (0 oldest, 1 newest) below `top`.
    let spread = |i: usize, top: f64| ((i * 7919) % 1000) as f64 / 1000.0 * top;
    let deep = fill.seq(DEEP);
    let mut out = Vec::new();
    type MakeFilter<'a> = Box<dyn Fn(usize, f64) -> Filter + 'a>;
    let filters: [(&'static str, MakeFilter); 7] = [
        (
            "by account",
            Box::new(|i, top| Filter {
                account: Some(account_for((fill.row(spread(i, top)) % 10_000) as usize)),
                ..Default::default()
            }),
        ),
        (
            "by actor",
            Box::new(|i, top| Filter {
                actor: Some(format!("actor-{}", fill.row(spread(i, top)) % 1000)),
                ..Default::default()
            }),
        ),
        (
            "by request id",
            Box::new(|i, top| Filter {
                request_id: Some(format!("req-{}", fill.row(spread(i, top)) / 3)),
                ..Default::default()
            }),
        ),
        // What the console's search asks for every query: an id, under
        // any key of an entry's targets; here one found nowhere, the case
        // that reads furthest without an index.
        (
            "by target (an id found nowhere)",
            Box::new(|i, _| Filter {
                target: Some(format!("gen-missing-{i}")),
                ..Default::default()
            }),
        ),
        (
            "by action (one entry in 100,000)",
            Box::new(|_, _| Filter {
                action: Some("key.revoked".to_owned()),
                ..Default::default()
            }),
        ),
        (
            "by action family (generation)",
            Box::new(|_, _| Filter {
                action: Some("generation".to_owned()),
                ..Default::default()
            }),
        ),
        (
            "by time range (one day)",
            Box::new(|i, top| {
                let end = fill.at(spread(i, top)) + chrono::Duration::hours(12);
                Filter {
                    from: Some(end - chrono::Duration::days(1)),
                    to: Some(end),
                    ..Default::default()
                }
            }),
        ),
    ];
    for (name, make) in filters {
        let mut first = Vec::with_capacity(samples);
        let mut deep_ms = Vec::with_capacity(samples);
        let (mut first_rows, mut deep_rows) = (0, 0);
        for i in 0..samples {
            let f = make(i, 1.0);
            let t = Instant::now();
            first_rows += query(pool, &f, 50, false, Shows::Everything).await?.len();
            first.push(millis(t));
            let f = Filter {
                cursor: Some(deep),
                ..make(i, DEEP)
            };
            let t = Instant::now();
            deep_rows += query(pool, &f, 50, false, Shows::Everything).await?.len();
            deep_ms.push(millis(t));
        }
        let per = |rows: usize| rows as f64 / samples.max(1) as f64;
        out.push(AuditQuery {
            filter: name,
            first_page: percentiles(first),
            first_page_rows: per(first_rows),
            deep_cursor: percentiles(deep_ms),
            deep_cursor_rows: per(deep_rows),
        });
    }
    Ok(out)
}

/// The account id `fill_audit` gives entry `i % 10000`
/// (`lpad(to_hex(n), 32, '0')::uuid`).
fn account_for(i: usize) -> Uuid {
    Uuid::from_u128(i as u128)
}

/// Resident set sizes of a child process (current, peak), MiB.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub async fn wait_for_http(url: &str, limit: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + limit;
    while client.get(url).send().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{url} did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Part 10: `GET /metrics` over a Stripe mirror of `stripe_events`
/// processed events, a queue table holding `finished_jobs` Done jobs and
/// `finished_generations` finished generations.
#[derive(Debug, Serialize)]
pub struct Scrape {
    pub stripe_events: i64,
    /// Done jobs in the queue's table (the filled ones and the bench's own).
    pub finished_jobs: i64,
    /// Generations in their table (the filled ones and the bench's own).
    pub generations: i64,
    /// Before the folds: the scrape reads every processed event and every
    /// Done job.
    pub unfolded: Percentiles,
    /// The maintenance sweep's fold of the processing lag (a first run on a
    /// big mirror).
    pub fold_ms: f64,
    /// Its fold of the job durations (a first run on a full table).
    pub job_fold_ms: f64,
    /// Its fold of the finished generations' counts (a first run).
    pub generation_fold_ms: f64,
    /// After them: the scrape reads only the events processed and the jobs
    /// finished since (within the folds' 15-minute margins).
    pub folded: Percentiles,
}

/// Add `n` Done jobs to the queue's table, finished at random over the last
/// 7 days (what the retention keeps) after a run of 50 ms to 1 s; returns
/// how many Done jobs the table holds.
pub async fn fill_finished_jobs(pool: &PgPool, n: usize) -> anyhow::Result<i64> {
    fill_in_batches(
        pool,
        n,
        200_000,
        "insert into apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at, lock_at, done_at)
         select '\\x7b7d'::bytea, 'bench-finished-' || ($1 + i), 'slate.bench.finished', 'Done', 1, 1,
                t - interval '1 second', t - make_interval(secs => 0.05 + random() * 0.95), t
           from (select i, now() - random() * interval '7 days' as t
                   from generate_series(1, $2) i) f",
        "apalis.jobs",
        "select count(*) from apalis.jobs where status = 'Done'",
    )
    .await
}

/// Insert `n` rows with `insert` in batches of at most `batch` (`$1`: the
/// rows inserted so far, `$2`: how many to insert now, `$3`: `n` as a
/// float), then vacuum and analyze `table` and return what `count` counts.
async fn fill_in_batches(
    pool: &PgPool,
    n: usize,
    batch: usize,
    insert: &str,
    table: &str,
    count: &str,
) -> anyhow::Result<i64> {
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(batch);
        sqlx::query(sqlx::AssertSqlSafe(insert.to_owned()))
            .bind(done as i64)
            .bind(chunk as i64)
            .bind(n as f64)
            .execute(pool)
            .await?;
        done += chunk;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("vacuum analyze {table}")))
        .execute(pool)
        .await?;
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(count.to_owned()))
        .fetch_one(pool)
        .await?)
}

/// Add `n` credit buckets for 100,000 accounts (a tenth of them promotions,
/// the rest purchases; a third with credits left), as the grants of a
/// service in its second year leave them; returns how many the table holds.
pub async fn fill_credit_buckets(pool: &PgPool, n: usize) -> anyhow::Result<i64> {
    fill_in_batches(
        pool,
        n,
        200_000,
        "insert into credit_buckets (bucket_id, account_id, source, stripe_object, grant_key,
                                     amount, remaining, consumed, expires_at, granted_position,
                                     granted_at)
         select gen_random_uuid(), lpad(to_hex(1000000 + ($1 + i) % 100000), 32, '0')::uuid,
                case when ($1 + i) % 10 = 0 then 'promotion' else 'purchase' end,
                case when ($1 + i) % 10 = 0 then null else 'pi_bench_bucket_' || ($1 + i) end,
                'bench-bucket-' || ($1 + i), 1000,
                case when ($1 + i) % 3 = 0 then 1000 else 0 end,
                case when ($1 + i) % 3 = 0 then 0 else 1000 end,
                now() + make_interval(days => (($1 + i) % 365)::int), $1 + i, now()
           from generate_series(1, $2) i",
        "credit_buckets",
        "select count(*) from credit_buckets",
    )
    .await
}

/// Add `n` finished generations (the four kinds; mostly succeeded, some
/// failed or canceled), finished at random over the last 30 days, for 1,000
/// accounts; returns how many generations the table holds.
pub async fn fill_generations(pool: &PgPool, n: usize) -> anyhow::Result<i64> {
    fill_in_batches(
        pool,
        n,
        200_000,
        "insert into generations (generation_id, account_id, kind, provider, operation, units,
                                  cost, collection_id, status, attempts, created_at, updated_at,
                                  finished_at)
         select gen_random_uuid(), lpad(to_hex(($1 + i) % 1000), 32, '0')::uuid,
                (array['video', 'voiceover', 'transcription', 'script'])[1 + ($1 + i) % 4],
                'local', 'bench', 1, 4, 'bench',
                (array['succeeded', 'succeeded', 'succeeded', 'failed', 'canceled'])[1 + ($1 + i) % 5],
                1, t - interval '5 seconds', t, t
           from (select i, now() - random() * interval '30 days' as t
                   from generate_series(1, $2) i) f",
        "generations",
        "select count(*) from generations",
    )
    .await
}

/// Stripe customers the mirror's events name (`cus_bench_<i % CUSTOMERS>`,
/// the literal in [`fill_stripe_mirror`]): 10 events each at 1 M.
const CUSTOMERS: i64 = 100_000;

/// Add `n` processed events to the Stripe mirror, shaped like the real rows
/// (a checkout's body, about 1.4 kB, naming one of [`CUSTOMERS`] and its
/// email), received over the `n` seconds before an hour ago and processed
/// within a second of it (past the fold's margin). Their `refs` are not
/// written: as the rows mirrored before that column existed.
pub async fn fill_stripe_mirror(pool: &PgPool, n: usize) -> anyhow::Result<i64> {
    fill_in_batches(
        pool,
        n,
        100_000,
        "insert into stripe_events (stripe_event_id, event_type, api_version, livemode,
                created, object_id, payment_intent, raw, source, parsed, received_at,
                last_received_at, status, attempts, outcome, processed_at)
         select 'evt_bench_' || g, 'checkout.session.completed', '2025-03-31.basil', false,
                r, 'cs_bench_' || g, 'pi_bench_' || g,
                '{\"id\":\"evt_bench_' || g || '\",\"object\":\"event\",\"data\":{\"object\":{\"id\":\"cs_bench_'
                  || g || '\",\"customer\":\"cus_bench_' || g % 100000 || '\",\"customer_email\":\"bench@example.com\",\"amount_total\":1000,\"metadata\":{\"k\":\"'
                  || repeat(md5(g::text), 40) || '\"}}}}',
                'webhook', true, r, r, 'processed', 1, 'granted',
                r + make_interval(secs => (g % 1000) / 1000.0)
           from generate_series($1::bigint, $1 + $2 - 1) g,
                lateral (select now() - interval '1 hour' - make_interval(secs => $3 - g)) t(r)",
        "stripe_events",
        "select count(*) from stripe_events where processed_at is not null",
    )
    .await
}

/// Part 10 on `pool`'s database: fill the mirror and the queue's table, time
/// scrapes through a server of this build, fold both, time them again.
pub async fn scrape(
    config: &crate::config::Config,
    pool: &PgPool,
    opts: &ScaleOptions,
) -> anyhow::Result<Scrape> {
    let stripe_events = fill_stripe_mirror(pool, opts.stripe_events).await?;
    let finished_jobs = fill_finished_jobs(pool, opts.finished_jobs).await?;
    let generations = fill_generations(pool, opts.finished_generations).await?;
    let token = config
        .metrics_token
        .as_ref()
        .map(|t| format!("Bearer {}", t.expose()));
    crate::bench::serving(config.clone(), pool, |base| async move {
        let url = format!("{base}/metrics");
        let client = reqwest::Client::new();
        let time = |n: usize| {
            let (client, url, token) = (&client, &url, &token);
            async move {
                let mut ms = Vec::with_capacity(n);
                for _ in 0..n {
                    let mut req = client.get(url);
                    if let Some(t) = token {
                        req = req.header("authorization", t);
                    }
                    let t = Instant::now();
                    let r = req.send().await?;
                    anyhow::ensure!(r.status().is_success(), "GET /metrics: {}", r.status());
                    r.bytes().await?;
                    ms.push(millis(t));
                }
                anyhow::Ok(percentiles(ms))
            }
        };
        let unfolded = time(opts.scrape_samples).await?;
        let t = Instant::now();
        slate_workers::stripe::fold_processing_lag(pool, chrono::Utc::now()).await?;
        let fold_ms = millis(t);
        let t = Instant::now();
        slate_workers::jobs::fold_durations(pool, chrono::Utc::now()).await?;
        let job_fold_ms = millis(t);
        let t = Instant::now();
        slate_workers::generations::fold_counts(pool, chrono::Utc::now()).await?;
        let generation_fold_ms = millis(t);
        let folded = time(opts.scrape_samples).await?;
        anyhow::Ok(Scrape {
            stripe_events,
            finished_jobs,
            generations,
            generation_fold_ms,
            unfolded,
            fold_ms,
            job_fold_ms,
            folded,
        })
    })
    .await
}

/// Part 11: an account's purge finding its mirrored Stripe events, over the
/// mirror of part 10, before and after the maintenance sweep has written
/// the ids each event names (`stripe_events.refs`).
#[derive(Debug, Serialize)]
pub struct PurgeLookup {
    pub stripe_events: i64,
    /// Every row not mapped yet (as just after the upgrade): each purge
    /// scans their bodies.
    pub unmapped: Percentiles,
    /// The sweep's batches over the whole mirror.
    pub map_seconds: f64,
    pub mapped_per_second: f64,
    /// Through the index of the ids.
    pub mapped: Percentiles,
    /// The size of that index (`stripe_events_refs_idx`) once written.
    pub refs_index_mib: f64,
    /// Events found and redacted (then rolled back) by a purge, fewest and
    /// most.
    pub events_per_account: (u64, u64),
}

/// Part 11 on `pool`'s database, after [`fill_stripe_mirror`]: the purge's
/// redaction of the mirror (`redact_personal_details`, each in a
/// transaction rolled back) for accounts owning one of its customers, then
/// the sweep's mapping of every row, then the redaction again.
pub async fn purge_lookup(pool: &PgPool, opts: &ScaleOptions) -> anyhow::Result<PurgeLookup> {
    let stripe_events: i64 = sqlx::query_scalar("select count(*) from stripe_events")
        .fetch_one(pool)
        .await?;
    // The customers the filled mirror names (part 3's events, in the same
    // table in a full run, name none of them).
    let customers = CUSTOMERS.min(opts.stripe_events.max(1) as i64);
    sqlx::query(
        "insert into stripe_customers (customer_id, account_id, linked_at)
         select 'cus_bench_' || k, lpad(to_hex(k), 32, '0')::uuid, now()
           from generate_series(0, $1 - 1) k
         on conflict do nothing",
    )
    .bind(customers)
    .execute(pool)
    .await?;
    sqlx::query("analyze stripe_customers")
        .execute(pool)
        .await?;
    async fn redact(
        pool: &PgPool,
        customers: i64,
        samples: usize,
    ) -> anyhow::Result<(Percentiles, (u64, u64))> {
        let (mut ms, mut found) = (Vec::with_capacity(samples), (u64::MAX, 0));
        for i in 0..samples {
            let account = account_for((i * 7919) % customers as usize);
            let mut tx = pool.begin().await?;
            let t = Instant::now();
            let n = slate_events::stripe::redact_personal_details(&mut tx, account).await?;
            found = (found.0.min(n), found.1.max(n));
            ms.push(millis(t));
            tx.rollback().await?;
        }
        Ok((percentiles(ms), found))
    }
    // Each one reads the whole mirror: a few are enough.
    let (unmapped, _) = redact(pool, customers, opts.purge_scan_samples).await?;
    let t = Instant::now();
    // The sweep's batches, without its time budget.
    slate_workers::sweeper::map_stripe_events(pool, std::time::Duration::MAX).await?;
    let map_seconds = t.elapsed().as_secs_f64();
    sqlx::query("vacuum analyze stripe_events")
        .execute(pool)
        .await?;
    let (mapped, events_per_account) = redact(pool, customers, opts.samples).await?;
    let refs_index_mib: f64 =
        sqlx::query_scalar("select pg_relation_size('stripe_events_refs_idx')::float8 / 1048576")
            .fetch_one(pool)
            .await?;
    Ok(PurgeLookup {
        stripe_events,
        unmapped,
        map_seconds,
        mapped_per_second: stripe_events as f64 / map_seconds.max(1e-9),
        mapped,
        refs_index_mib,
        events_per_account,
    })
}
