//! Asynchronous projection `credit_ledger`: one row per credit movement, with
//! its effect on available, reserved and debt. Every delta comes from the
//! event alone.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Table;
use crate::Error;
use crate::catalog::DomainEvent;

pub const NAME: &str = "credit_ledger";

pub const TABLES: &[Table] = &[Table {
    name: "credit_ledger_entries",
    columns: "global_position, account_id, event_type, generation_id, bucket_id, \
              delta_available, delta_reserved, delta_debt, recorded_at",
}];

pub const EVENT_TYPES: &[&str] = &[
    "CreditsGranted",
    "CreditsReserved",
    "CreditsCaptured",
    "CreditsReleased",
    "CreditsRevoked",
    "CreditsExpired",
];

pub async fn apply(
    conn: &mut PgConnection,
    prefix: &str,
    event: &DomainEvent,
    position: i64,
    recorded_at: DateTime<Utc>,
) -> Result<(), Error> {
    // (generation, bucket, Δavailable, Δreserved, Δdebt)
    let (generation, bucket, da, dr, dd): (Option<Uuid>, Option<Uuid>, i64, i64, i64) = match event
    {
        DomainEvent::CreditsGranted(e) => (
            None,
            Some(e.bucket_id),
            e.amount - e.debt_settled,
            0,
            -e.debt_settled,
        ),
        DomainEvent::CreditsReserved(e) => (Some(e.generation_id), None, -e.amount, e.amount, 0),
        DomainEvent::CreditsCaptured(e) => {
            let (owed, settled) = (e.owed_total(), e.settled_total());
            (
                Some(e.generation_id),
                None,
                -settled,
                -e.amount,
                owed - settled,
            )
        }
        DomainEvent::CreditsReleased(e) => {
            let restored: i64 = e.draws.iter().map(|d| d.restored).sum();
            let settled: i64 = e.draws.iter().map(|d| d.debt_settled).sum();
            (Some(e.generation_id), None, restored, -e.amount, -settled)
        }
        DomainEvent::CreditsRevoked(e) => (None, Some(e.bucket_id), -e.taken, 0, e.debt_added),
        DomainEvent::CreditsExpired(e) => (None, Some(e.bucket_id), -e.amount, 0, 0),
        _ => return Ok(()),
    };
    sqlx::query(trusted_sql!(
        "insert into {prefix}credit_ledger_entries (global_position, account_id, event_type,
            generation_id, bucket_id, delta_available, delta_reserved, delta_debt, recorded_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(position)
    .bind(event.account_id())
    .bind(event.event_type())
    .bind(generation)
    .bind(bucket)
    .bind(da)
    .bind(dr)
    .bind(dd)
    .bind(recorded_at)
    .execute(conn)
    .await?;
    Ok(())
}
