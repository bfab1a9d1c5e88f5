//! `GET /metrics` in Prometheus text format: state read from the database
//! at scrape time, so every process reports the same figures; plus this
//! process's HTTP request counters and latency histograms.

use std::fmt::Write;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sha2::{Digest, Sha256};
use slate_events::projections::Projection;

use super::{ApiError, AppState};

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(metrics))
}

// Upper bounds (seconds) of the job-duration and processing-lag buckets.
use slate_workers::jobs::DURATION_BUCKETS;

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

    let jobs: Vec<(String, String, i64)> = sqlx::query_as(
        "select job_type, status, count(*) from apalis.jobs group by 1, 2 order by 1, 2",
    )
    .fetch_all(pool)
    .await?;
    out.push_str(
        "# HELP slate_jobs Jobs in the queue, by queue and status.\n# TYPE slate_jobs gauge\n",
    );
    for (queue, status, n) in &jobs {
        let _ = writeln!(
            out,
            "slate_jobs{{queue=\"{}\",status=\"{}\"}} {n}",
            label(queue),
            label(status)
        );
    }

    // Durations of finished jobs (pickup to done), cumulative per bucket:
    // the jobs still in the queue's table plus those its retention deleted
    // (added up in `job_durations_retired` as they went).
    let durations: Vec<(String, Vec<i64>, i64, f64)> = sqlx::query_as(
        "with j as (select job_type, extract(epoch from done_at - lock_at)::float8 d
                      from apalis.jobs
                     where status = 'Done' and lock_at is not null and done_at is not null),
              live as (select j.job_type, b.le, count(*) n, sum(j.d) s
                         from j join unnest($1::float8[]) b(le) on j.d <= b.le group by 1, 2),
              types as (select job_type from live union select job_type from job_durations_retired),
              cells as (select t.job_type, b.le,
                               coalesce(l.n, 0) + coalesce(r.jobs, 0) n,
                               coalesce(l.s, 0) + coalesce(r.seconds, 0) s
                          from types t cross join unnest($1::float8[]) b(le)
                          left join live l on l.job_type = t.job_type and l.le = b.le
                          left join job_durations_retired r on r.job_type = t.job_type and r.le = b.le)
         select job_type,
                array_agg(n::bigint order by le) filter (where le < 'Infinity'),
                (max(n) filter (where le = 'Infinity'))::bigint,
                (max(s) filter (where le = 'Infinity'))::float8
           from cells group by 1 order by 1",
    )
    .bind(slate_workers::jobs::duration_bounds())
    .fetch_all(pool)
    .await?;
    out.push_str("# HELP slate_job_duration_seconds Finished jobs by queue, from pickup to done.\n# TYPE slate_job_duration_seconds histogram\n");
    for (queue, buckets, count, sum) in &durations {
        let q = label(queue);
        for (le, n) in DURATION_BUCKETS.iter().zip(buckets) {
            let _ = writeln!(
                out,
                "slate_job_duration_seconds_bucket{{queue=\"{q}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "slate_job_duration_seconds_bucket{{queue=\"{q}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "slate_job_duration_seconds_sum{{queue=\"{q}\"}} {sum:.6}"
        );
        let _ = writeln!(
            out,
            "slate_job_duration_seconds_count{{queue=\"{q}\"}} {count}"
        );
    }

    // Webhook processing lag: received (first delivery) to processed, for
    // every processing: those before the watermark folded into totals by the
    // maintenance sweep, those since read through their index. And the age
    // of the oldest event still waiting.
    let watermark: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select upto from stripe_lag_watermark")
            .fetch_one(pool)
            .await?;
    let (lag_buckets, lag_count, lag_sum, waiting): (Vec<i64>, i64, f64, Option<f64>) =
        sqlx::query_as(
            "with p as (select extract(epoch from processed_at - received_at)::float8 d
                          from stripe_events where processed_at >= $2),
                  live as (select b.le, count(p.d) filter (where p.d <= b.le) n,
                                  coalesce(sum(p.d) filter (where p.d <= b.le), 0) s
                             from unnest($1::float8[]) b(le) left join p on true group by 1),
                  cells as (select l.le, l.n + coalesce(r.events, 0) n, l.s + coalesce(r.seconds, 0) s
                              from live l left join stripe_lag_retired r on r.le = l.le)
             select (select array_agg(n order by le) from cells where le < 'Infinity'),
                    (select n from cells where le = 'Infinity'),
                    (select s from cells where le = 'Infinity'),
                    (select extract(epoch from now() - min(received_at))::float8
                       from stripe_events where status = 'pending')",
        )
        .bind(slate_workers::jobs::duration_bounds())
        .bind(watermark)
        .fetch_one(pool)
        .await?;
    out.push_str("# HELP slate_stripe_processing_lag_seconds Stripe events from receipt to processed.\n# TYPE slate_stripe_processing_lag_seconds histogram\n");
    for (le, n) in DURATION_BUCKETS.iter().zip(&lag_buckets) {
        let _ = writeln!(
            out,
            "slate_stripe_processing_lag_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "slate_stripe_processing_lag_seconds_bucket{{le=\"+Inf\"}} {lag_count}"
    );
    let _ = writeln!(out, "slate_stripe_processing_lag_seconds_sum {lag_sum:.6}");
    let _ = writeln!(out, "slate_stripe_processing_lag_seconds_count {lag_count}");
    out.push_str("# HELP slate_stripe_oldest_pending_seconds Age of the oldest Stripe event not processed yet (0: none).\n# TYPE slate_stripe_oldest_pending_seconds gauge\n");
    let _ = writeln!(
        out,
        "slate_stripe_oldest_pending_seconds {:.3}",
        waiting.unwrap_or(0.0)
    );

    let generations: Vec<(String, String, i64)> = sqlx::query_as(
        "select kind, status, count(*) from generations group by 1, 2 order by 1, 2",
    )
    .fetch_all(pool)
    .await?;
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

    out.push_str("# HELP slate_projection_lag_events Events of an asynchronous projection's types not applied yet.\n# TYPE slate_projection_lag_events gauge\n");
    out.push_str("# HELP slate_projection_lag_seconds Age of the oldest event not applied yet.\n# TYPE slate_projection_lag_seconds gauge\n");
    for &p in Projection::ASYNC {
        let (behind, oldest): (i64, Option<f64>) = sqlx::query_as(
            "select count(*), extract(epoch from now() - min(e.recorded_at))::float8 from events e
              where e.event_type = any($2)
                and (e.transaction_id, e.global_position) >
                    coalesce((select (last_transaction_id, last_position) from projection_checkpoints
                               where projection = $1), ('0'::xid8, 0::bigint))",
        )
        .bind(p.name())
        .bind(p.event_types())
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
