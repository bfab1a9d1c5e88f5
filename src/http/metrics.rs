//! `GET /metrics` in Prometheus text format: state read from the database
//! at scrape time, so every process reports the same figures; plus this
//! process's HTTP request counters and latency histograms.

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sha2::{Digest, Sha256};
use slate_events::projections::Projection;
use slate_workers::jobs::{DURATION_BUCKETS, bucket_aggregates_query};

use super::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

/// Bounds of the job-duration and processing-lag buckets, +Inf included.
const BOUNDS: usize = DURATION_BUCKETS.len() + 1;

/// The durations of one queue's Done jobs not folded yet (aligned with
/// [`bucket_aggregates_query`]'s bounds).
#[derive(sqlx::FromRow)]
struct QueueDurations {
    job_type: String,
    counts: Vec<i64>,
    sums: Vec<f64>,
}

/// Where `slate_projection_lag_events` stops counting: a projection this far
/// behind needs someone either way, and each event counted is an index entry
/// and a heap row read at every scrape (10 ms at this cap, 140–170 ms at
/// 100,000, on a slow 2-core machine).
const LAG_COUNT_CAP: i64 = 10_000;

/// A cumulative histogram over [`duration_bounds`](slate_workers::jobs::duration_bounds): per bound, how many
/// observations were at most it (the last, +Inf, counts them all), and the
/// sum of them all.
#[derive(Default)]
struct Cumulative {
    counts: [i64; BOUNDS],
    sum: f64,
}

impl Cumulative {
    /// Add arrays aligned with [`duration_bounds`](slate_workers::jobs::duration_bounds) (as
    /// [`bucket_aggregates_query`] gives them).
    fn add_all(&mut self, counts: &[i64], sums: &[f64]) {
        for (total, n) in self.counts.iter_mut().zip(counts) {
            *total += n;
        }
        self.sum += sums.get(DURATION_BUCKETS.len()).copied().unwrap_or(0.0);
    }

    /// Add a folded total at bound `le`; a bound no longer in use (the
    /// buckets changed) is left out.
    fn add(&mut self, le: f64, n: i64, seconds: f64) {
        if le == f64::INFINITY {
            self.counts[DURATION_BUCKETS.len()] += n;
            self.sum += seconds;
        } else if let Some(i) = DURATION_BUCKETS.iter().position(|b| *b == le) {
            self.counts[i] += n;
        }
    }

    /// Prometheus text for the histogram `name` with `labels` (`k="v",…`
    /// or empty) on each line.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (le, n) in DURATION_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
        }
        let (all, sum) = (self.counts[DURATION_BUCKETS.len()], self.sum);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {all}");
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {sum:.6}");
        let _ = writeln!(out, "{name}_count{braced} {all}");
    }
}

/// Does the request carry `token` as its bearer credential? Digests are
/// compared, so the time taken says nothing about how much of it matched.
fn bearer_is(headers: &HeaderMap, token: &str) -> bool {
    let sent = headers
        .get(header::AUTHORIZATION)
        .map_or("", super::extract::bearer);
    Sha256::digest(sent.as_bytes()) == Sha256::digest(token.as_bytes())
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

/// Prometheus metrics.
///
/// The Stripe mirror, jobs, generations, holds, projection lag, and this
/// process's request counters and latencies. When the server has a metrics
/// token (`SLATE_METRICS_TOKEN`), only a scraper that sends it as
/// `Authorization: Bearer <token>` is answered.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain; version=0.0.4", body = String)),
)]
pub(super) async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(token) = &state.config.metrics_token
        && !bearer_is(&headers, token.expose())
    {
        return Err(ApiError::client(
            StatusCode::UNAUTHORIZED,
            "metrics_token_invalid",
            "this server's metrics token is required (Authorization: Bearer …)",
        ));
    }
    let pool = &state.pool;
    let mut out = String::new();

    // The mirror is kept for ever (for replay), so nothing here reads all of
    // it: events that need attention by status, unparsed ones by their own
    // index, and deliveries counted by this process as they arrive.
    let stripe: Vec<(String, bool, i64)> = sqlx::query_as(
        "select status, parsed, count(*) from stripe_events
          where status in ('pending', 'failed') group by 1, 2 order by 1, 2",
    )
    .fetch_all(pool)
    .await?;
    out.push_str("# HELP slate_stripe_events Verified Stripe events not processed yet (pending) or whose processing failed, by whether async-stripe could parse them. Processed events are counted by slate_stripe_processing_lag_seconds_count.\n# TYPE slate_stripe_events gauge\n");
    for (status, parsed, n) in &stripe {
        let _ = writeln!(
            out,
            "slate_stripe_events{{status=\"{}\",parsed=\"{parsed}\"}} {n}",
            label(status)
        );
    }
    let unparsed: i64 = sqlx::query_scalar("select count(*) from stripe_events where not parsed")
        .fetch_one(pool)
        .await?;
    out.push_str("# HELP slate_stripe_events_unparsed Verified events the typed parser could not read (mirrored and processed tolerantly).\n# TYPE slate_stripe_events_unparsed gauge\n");
    let _ = writeln!(out, "slate_stripe_events_unparsed {unparsed}");
    state.stripe_deliveries.render(&mut out);

    // The histograms and the generation counts add rows still in their
    // tables to totals folded out of them (the job-duration fold, the Stripe
    // lag fold, the generation-count fold): each read with its watermark in
    // one snapshot, or a fold committing in between would count its rows
    // twice and the counters would go back down at the next scrape.
    let mut snapshot = pool
        .begin_with("begin isolation level repeatable read read only")
        .await?;

    // Jobs that have not succeeded, by queue and status, through their own
    // index; and the durations of the finished ones (pickup to done),
    // cumulative per bucket: the Done jobs finished since the watermark,
    // through their index, plus the totals folded before it. The Done jobs
    // the retention keeps (7 days) are never read whole.
    let jobs: Vec<(String, String, i64)> = sqlx::query_as(
        "select job_type, status, count(*) from apalis.jobs
          where status <> 'Done' group by 1, 2 order by 1, 2",
    )
    .fetch_all(&mut *snapshot)
    .await?;
    out.push_str("# HELP slate_jobs Jobs in the queue that have not succeeded, by queue and status (succeeded jobs are counted by slate_job_duration_seconds_count).\n# TYPE slate_jobs gauge\n");
    for (queue, status, n) in &jobs {
        let _ = writeln!(
            out,
            "slate_jobs{{queue=\"{}\",status=\"{}\"}} {n}",
            label(queue),
            label(status),
        );
    }
    // The folds' watermarks: rows before them are in the totals. Scalar
    // subqueries, not a join: the planner, which knows nothing of these
    // one-row tables, costed the join of three at 10^10 rows and compiled it
    // with JIT at every scrape (25 ms).
    type At = chrono::DateTime<chrono::Utc>;
    let (jobs_folded_upto, lag_folded_upto, generations_folded_upto): (At, At, At) =
        sqlx::query_as(
            "select (select upto from job_duration_watermark),
                    (select upto from stripe_lag_watermark),
                    (select upto from generation_count_watermark)",
        )
        .fetch_one(&mut *snapshot)
        .await?;
    let done: Vec<QueueDurations> = sqlx::query_as(sqlx::AssertSqlSafe(bucket_aggregates_query(
        Some("job_type"),
        "select job_type, extract(epoch from done_at - lock_at)::float8 d
               from apalis.jobs where status = 'Done' and done_at >= $1",
    )))
    .bind(jobs_folded_upto)
    // Planned for this watermark each time (see the Stripe lag below).
    .persistent(false)
    .fetch_all(&mut *snapshot)
    .await?;
    let retired: Vec<(String, f64, i64, f64)> =
        sqlx::query_as("select job_type, le, jobs, seconds from job_durations_retired")
            .fetch_all(&mut *snapshot)
            .await?;
    let mut durations: BTreeMap<String, Cumulative> = BTreeMap::new();
    for j in done {
        durations
            .entry(j.job_type)
            .or_default()
            .add_all(&j.counts, &j.sums);
    }
    for (queue, le, n, seconds) in retired {
        durations.entry(queue).or_default().add(le, n, seconds);
    }
    out.push_str("# HELP slate_job_duration_seconds Finished jobs by queue, from pickup to done.\n# TYPE slate_job_duration_seconds histogram\n");
    for (queue, h) in &durations {
        h.render(
            &mut out,
            "slate_job_duration_seconds",
            &format!("queue=\"{}\"", label(queue)),
        );
    }

    // Webhook processing lag: received (first delivery) to processed, for
    // every processing: those before the watermark folded into totals by the
    // maintenance sweep, those since read through their index. And the age
    // of the oldest event still waiting.
    let (counts, sums, waiting): (Vec<i64>, Vec<f64>, Option<f64>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select a.counts, a.sums,
                    (select extract(epoch from now() - min(received_at))::float8
                       from stripe_events where status = 'pending')
               from ({}) a",
            bucket_aggregates_query(
                None,
                "select extract(epoch from processed_at - received_at)::float8 d
                   from stripe_events where processed_at >= $1"
            )
        )))
        .bind(lag_folded_upto)
        // Planned for this watermark each time: a plan cached while many
        // events were past the watermark (before the first fold) stays a
        // scan of the mirror once few are (5 ms a scrape at 100,000 events).
        .persistent(false)
        .fetch_one(&mut *snapshot)
        .await?;
    let retired: Vec<(f64, i64, f64)> =
        sqlx::query_as("select le, events, seconds from stripe_lag_retired")
            .fetch_all(&mut *snapshot)
            .await?;
    let mut lag = Cumulative::default();
    lag.add_all(&counts, &sums);
    for (le, n, seconds) in retired {
        lag.add(le, n, seconds);
    }
    out.push_str("# HELP slate_stripe_processing_lag_seconds Stripe events from receipt to processed.\n# TYPE slate_stripe_processing_lag_seconds histogram\n");
    lag.render(&mut out, "slate_stripe_processing_lag_seconds", "");
    // Generations: queued and running ones through their own index;
    // finished ones as the totals folded before the watermark plus those
    // finished since, through theirs. The table, which keeps every
    // generation, is never read whole.
    let generations: Vec<(String, String, i64)> = sqlx::query_as(
        // Every kind and status, 0 where there are none: a series that
        // appears only with its first generation (or vanishes) leaves
        // rates and alerts on it without a start.
        "select kind, status, sum(n)::int8 from (
             select k.kind, s.status, 0::int8 as n
               from unnest($2::text[]) k (kind) cross join unnest($3::text[]) s (status)
             union all
             select kind, status, count(*) from generations
              where status in ('queued', 'running') group by 1, 2
             union all
             select kind, status, generations from generations_finished_retired
             union all
             select kind, status, count(*) from generations
              where finished_at >= $1 group by 1, 2) c
          group by 1, 2 order by 1, 2",
    )
    .bind(generations_folded_upto)
    .bind(slate_events::generations::KINDS)
    .bind(slate_events::generations::STATUSES)
    // Planned for this watermark each time (see the Stripe lag above): a
    // plan that does not know it scans the table (84 ms at 1 M rows).
    .persistent(false)
    .fetch_all(&mut *snapshot)
    .await?;
    snapshot.commit().await?;
    out.push_str("# HELP slate_stripe_oldest_pending_seconds Age of the oldest Stripe event not processed yet (0: none).\n# TYPE slate_stripe_oldest_pending_seconds gauge\n");
    let _ = writeln!(
        out,
        "slate_stripe_oldest_pending_seconds {:.3}",
        waiting.unwrap_or(0.0)
    );

    out.push_str("# HELP slate_generations Generations by kind (video, voiceover, transcription, script) and status.\n# TYPE slate_generations gauge\n");
    for (kind, status, n) in &generations {
        let _ = writeln!(
            out,
            "slate_generations{{kind=\"{}\",status=\"{}\"}} {n}",
            label(kind),
            label(status)
        );
    }

    let (holds, held): (i64, Option<i64>) = sqlx::query_as(
        "select count(*), sum(amount)::bigint from credit_reservations where status = 'reserved'",
    )
    .fetch_one(pool)
    .await?;
    out.push_str("# HELP slate_credit_reservations_outstanding Reservations neither captured nor released.\n# TYPE slate_credit_reservations_outstanding gauge\n");
    let _ = writeln!(out, "slate_credit_reservations_outstanding {holds}");
    out.push_str("# HELP slate_credits_reserved Credits held by outstanding reservations.\n# TYPE slate_credits_reserved gauge\n");
    let _ = writeln!(out, "slate_credits_reserved {}", held.unwrap_or(0));

    // Deleted accounts whose grace period has ended and which are not
    // purged yet. The maintenance sweep queues each within a sweep interval,
    // and a purge that keeps failing is retried for ever (about every ten
    // minutes, with the backoff's jitter up to twelve and a half; once its
    // 20 attempts are spent the sweep queues it again): this is what an
    // alert watches.
    // Read through `accounts_purge_due_idx`.
    let (overdue, oldest): (i64, Option<f64>) = sqlx::query_as(
        "select count(*), extract(epoch from now() - min(purge_after))::float8 from accounts
          where deleted_at is not null and purged_at is null and purge_after <= now()",
    )
    .fetch_one(pool)
    .await?;
    out.push_str("# HELP slate_purges_due Deleted accounts whose grace period has ended, not purged yet.\n# TYPE slate_purges_due gauge\n");
    let _ = writeln!(out, "slate_purges_due {overdue}");
    out.push_str("# HELP slate_purge_due_oldest_seconds How long the oldest of them has been due (0: none).\n# TYPE slate_purge_due_oldest_seconds gauge\n");
    let _ = writeln!(
        out,
        "slate_purge_due_oldest_seconds {:.3}",
        oldest.unwrap_or(0.0).max(0.0)
    );

    let _ = writeln!(
        out,
        "# HELP slate_projection_lag_events Events of an asynchronous projection's types not applied yet, counted up to {LAG_COUNT_CAP}.\n# TYPE slate_projection_lag_events gauge"
    );
    let _ = writeln!(
        out,
        "# HELP slate_projection_lag_seconds Age of the oldest of the next events (up to {LAG_COUNT_CAP}) an asynchronous projection has to apply (0: none).\n# TYPE slate_projection_lag_seconds gauge"
    );
    // The checkpoints as values, and each count planned for them: against a
    // subquery's result the row comparison is no index condition, and every
    // scrape read the whole log (1.1 s at 11.5 M events, with every
    // projection caught up).
    let checkpoints: BTreeMap<String, (String, i64)> = sqlx::query_as(
        "select projection, last_transaction_id::text, last_position from projection_checkpoints",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(p, txid, position): (String, String, i64)| (p, (txid, position)))
    .collect();
    for &p in Projection::ASYNC {
        let (txid, position) = checkpoints
            .get(p.name())
            .map_or(("0", 0), |(t, n)| (t.as_str(), *n));
        // One bounded read: the next events of its types in log order, from
        // the checkpoint, up to the cap; how many, and the oldest of them.
        // Unordered, a projection far behind got a sequential scan, which
        // reads every event before the checkpoint (they come first in the
        // table) before the first one it counts (1.2 M read and dropped,
        // 0.4 s, in psql). The next event alone (`limit 1`) was planned as
        // that walk even for types the log hardly holds, expecting a match
        // within a few thousand events: with none of them after the
        // checkpoint it read the whole log (the affiliate commissions' at
        // every scrape, 0.2-0.3 s at 10 M events). At the cap's size the
        // planner takes the type index for such types instead.
        let (behind, oldest): (i64, Option<f64>) = sqlx::query_as(
            "select count(*), extract(epoch from now() - min(recorded_at))::float8
               from (select e.recorded_at from events e
                      where e.event_type = any($1)
                        and (e.transaction_id, e.global_position) > ($2::xid8, $3::bigint)
                      order by e.transaction_id, e.global_position
                      limit $4) b",
        )
        .bind(p.event_types())
        .bind(txid)
        .bind(position)
        .bind(LAG_COUNT_CAP)
        .persistent(false)
        .fetch_one(pool)
        .await?;
        let _ = writeln!(
            out,
            "slate_projection_lag_events{{projection=\"{}\"}} {behind}",
            p.name()
        );
        let _ = writeln!(
            out,
            "slate_projection_lag_seconds{{projection=\"{}\"}} {:.3}",
            p.name(),
            oldest.unwrap_or(0.0)
        );
    }
    state.http_metrics.render(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out))
}
