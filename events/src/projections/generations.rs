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
              output_bytes, width, height, duration_ms, failure_code, created_at, updated_at",
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
                    output_bytes = $4, width = $5, height = $6, duration_ms = $7, updated_at = $8
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
                    attempts = greatest(attempts, $3), updated_at = $4
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
                "update {p}generations set status = 'canceled', failure_code = $2, updated_at = $3
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
