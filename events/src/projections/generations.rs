//! Inline projection `generations`: each generation's status, cost and
//! output, as its events say.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Table;
use crate::Error;
use crate::catalog::DomainEvent;

pub const TABLES: &[Table] = &[Table {
    name: "generations",
    columns: "generation_id, account_id, kind, provider, operation, units, cost, collection_id, status, \
              attempts, provider_handle, cancel_requested, deadline, output_key, output_content_type, \
              output_bytes, width, height, duration_ms, failure_code, created_at, updated_at, finished_at",
}];

pub const EVENT_TYPES: &[&str] = &[
    "GenerationRequested",
    "GenerationStarted",
    "GenerationSubmitted",
    "GenerationSucceeded",
    "GenerationFailed",
    "GenerationCancelRequested",
    "GenerationCanceled",
    "AccountPurged",
];

pub async fn apply(
    conn: &mut PgConnection,
    p: &str,
    event: &DomainEvent,
    at: DateTime<Utc>,
) -> Result<(), Error> {
    match event {
        DomainEvent::AccountPurged(e) if p.is_empty() => {
            // The live table: the purged generations already folded into
            // `/metrics`' totals come off them. The watermark is read
            // locked (a fold moving it waits for this commit, or this waits
            // for the fold's and reads where it moved).
            sqlx::query(
                "with gone as (
                     delete from generations where account_id = $1
                     returning kind, status, finished_at),
                 upto as (select upto from generation_count_watermark for share),
                 folded as (
                     select kind, status, count(*) as n from gone, upto
                      where gone.finished_at < upto.upto group by 1, 2)
                 update generations_finished_retired r
                    set generations = r.generations - folded.n
                   from folded
                  where r.kind = folded.kind and r.status = folded.status",
            )
            .bind(e.account_id)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::AccountPurged(e) => {
            sqlx::query(trusted_sql!(
                "delete from {p}generations where account_id = $1"
            ))
            .bind(e.account_id)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::GenerationRequested(e) => {
            sqlx::query(trusted_sql!(
                "insert into {p}generations (generation_id, account_id, kind, provider, operation, units,
                    cost, collection_id, status, deadline, created_at, updated_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $10)"
            ))
            .bind(e.generation_id)
            .bind(e.account_id)
            .bind(&e.kind)
            .bind(&e.provider)
            .bind(&e.operation)
            .bind(e.units)
            .bind(e.cost)
            .bind(&e.collection_id)
            .bind(e.deadline)
            .bind(at)
            .execute(conn)
            .await?;
        }
        DomainEvent::GenerationStarted(e) => {
            sqlx::query(trusted_sql!(
                "update {p}generations set status = 'running', attempts = greatest(attempts, $2), updated_at = $3
                  where generation_id = $1 and status in ('queued', 'running')"
            ))
            .bind(e.generation_id)
            .bind(e.attempt)
            .bind(at)
            .execute(conn)
            .await?;
        }
        DomainEvent::GenerationSubmitted(e) => {
            sqlx::query(trusted_sql!(
                "update {p}generations set provider_handle = $2, updated_at = $3 where generation_id = $1"
            ))
            .bind(e.generation_id)
            .bind(&e.provider_handle)
            .bind(at)
            .execute(conn)
            .await?;
        }
        DomainEvent::GenerationSucceeded(e) => {
            sqlx::query(trusted_sql!(
                "update {p}generations set status = 'succeeded', output_key = $2, output_content_type = $3,
                    output_bytes = $4, width = $5, height = $6, duration_ms = $7, updated_at = $8,
                    finished_at = $8
                  where generation_id = $1"
            ))
            .bind(e.generation_id)
            .bind(&e.output_key)
            .bind(&e.content_type)
            .bind(e.bytes)
            .bind(e.width)
            .bind(e.height)
            .bind(e.duration_ms)
            .bind(at)
            .execute(conn)
            .await?;
        }
        DomainEvent::GenerationFailed(e) => {
            sqlx::query(trusted_sql!(
                "update {p}generations set status = 'failed', failure_code = $2,
                    attempts = greatest(attempts, $3), updated_at = $4, finished_at = $4
                  where generation_id = $1"
            ))
            .bind(e.generation_id)
            .bind(&e.reason_code)
            .bind(e.attempts)
            .bind(at)
            .execute(conn)
            .await?;
        }
        DomainEvent::GenerationCancelRequested(e) => {
            sqlx::query(trusted_sql!(
                "update {p}generations set cancel_requested = true, updated_at = $2 where generation_id = $1"
            ))
            .bind(e.generation_id)
            .bind(at)
            .execute(conn)
            .await?;
        }
        DomainEvent::GenerationCanceled(e) => {
            sqlx::query(trusted_sql!(
                "update {p}generations set status = 'canceled', failure_code = $2, updated_at = $3,
                    finished_at = $3
                  where generation_id = $1"
            ))
            .bind(e.generation_id)
            .bind(&e.reason)
            .bind(at)
            .execute(conn)
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// In a rebuild of the live table, after its truncate (in its
/// transaction): the folded totals of finished generations start again from
/// nothing, and the next fold counts every finished generation again.
/// Replaying the purges must not take their generations off the totals a
/// second time. Like a purge and the fold, it locks `generations` before the
/// watermark.
pub(crate) async fn reset_finished_fold(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("update generation_count_watermark set upto = 'epoch'")
        .execute(&mut *conn)
        .await?;
    sqlx::query("delete from generations_finished_retired")
        .execute(&mut *conn)
        .await?;
    Ok(())
}
