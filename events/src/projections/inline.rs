//! The inline projections (accounts, credit balances, buckets,
//! reservations): written by the stored functions in the same transaction as
//! the append, and replayed from the log by this module on rebuild and verify.
//!
//! Replay applies recorded facts only; every decision (which bucket, how much
//! debt) is in the event, so a rebuild cannot decide differently.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Table;
use crate::Error;
use crate::catalog::DomainEvent;

pub const TABLES: &[Table] = &[
    Table {
        name: "accounts",
        columns: "account_id, email, staff, created_at, deleted_at, purge_after, purged_at",
    },
    Table {
        name: "credit_accounts",
        columns: "account_id, available, reserved, debt, total_granted, total_captured, \
                  total_lapsed, total_revoked, total_debt_settled, total_debt_added",
    },
    Table {
        name: "credit_buckets",
        columns: "bucket_id, account_id, source, stripe_object, grant_key, amount, debt_settled, \
                  remaining, reserved, consumed, lapsed, revoked, revoked_lapsed, revoked_held, \
                  expires_at, expired, granted_position, granted_at",
    },
    Table {
        name: "credit_reservations",
        columns: "generation_id, account_id, amount, status, hold_expires_at, reserved_at, \
                  resolved_at, release_reason",
    },
    Table {
        name: "credit_reservation_draws",
        columns: "generation_id, bucket_id, amount",
    },
    Table {
        name: "credit_revocations",
        columns: "revoke_key, account_id, bucket_id, amount, taken, from_lapsed, held, debt_added, \
                  revoked_at",
    },
];

pub const EVENT_TYPES: &[&str] = &[
    "AccountCreated",
    "AccountDeletionRequested",
    "AccountRestored",
    "AccountPurged",
    "CreditsGranted",
    "CreditsReserved",
    "CreditsCaptured",
    "CreditsReleased",
    "CreditsRevoked",
    "CreditsExpired",
];

/// Apply one event to the tables named with `prefix` ("" for the live ones,
/// "scratch_" for verify's temporary copies).
pub async fn apply(
    conn: &mut PgConnection,
    prefix: &str,
    event: &DomainEvent,
    position: i64,
    recorded_at: DateTime<Utc>,
) -> Result<(), Error> {
    let p = prefix;
    match event {
        DomainEvent::AccountCreated(e) => {
            // Null once the account's key is erased (a rebuild after a purge).
            let email = crate::vault::open(conn, &e.email).await?.into_option();
            sqlx::query(trusted_sql!(
                "insert into {p}accounts (account_id, email, staff, created_at) values ($1, $2, $3, $4)"
            ))
            .bind(e.account_id)
            .bind(email)
            .bind(e.staff)
            .bind(recorded_at)
            .execute(&mut *conn)
            .await?;
            sqlx::query(trusted_sql!(
                "insert into {p}credit_accounts (account_id) values ($1)"
            ))
            .bind(e.account_id)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::AccountDeletionRequested(e) => {
            sqlx::query(trusted_sql!(
                "update {p}accounts set deleted_at = $2, purge_after = $3 where account_id = $1"
            ))
            .bind(e.account_id)
            .bind(recorded_at)
            .bind(e.purge_after)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::AccountPurged(e) => {
            sqlx::query(trusted_sql!(
                "update {p}accounts set email = null, purged_at = $2 where account_id = $1"
            ))
            .bind(e.account_id)
            .bind(recorded_at)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::AccountRestored(e) => {
            sqlx::query(trusted_sql!(
                "update {p}accounts set deleted_at = null, purge_after = null where account_id = $1"
            ))
            .bind(e.account_id)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::CreditsGranted(e) => {
            sqlx::query(trusted_sql!(
                "insert into {p}credit_buckets (bucket_id, account_id, source, stripe_object, grant_key,
                    amount, debt_settled, remaining, expires_at, granted_position, granted_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $6 - $7, $8, $9, $10)"
            ))
            .bind(e.bucket_id)
            .bind(e.account_id)
            .bind(e.source.as_str())
            .bind(&e.stripe_object)
            .bind(&e.grant_key)
            .bind(e.amount)
            .bind(e.debt_settled)
            .bind(e.expires_at)
            .bind(position)
            .bind(recorded_at)
            .execute(&mut *conn)
            .await?;
            sqlx::query(trusted_sql!(
                "update {p}credit_accounts
                    set available = available + $2 - $3, debt = debt - $3,
                        total_granted = total_granted + $2, total_debt_settled = total_debt_settled + $3
                  where account_id = $1"
            ))
            .bind(e.account_id)
            .bind(e.amount)
            .bind(e.debt_settled)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::CreditsReserved(e) => {
            sqlx::query(trusted_sql!(
                "insert into {p}credit_reservations (generation_id, account_id, amount, status,
                    hold_expires_at, reserved_at) values ($1, $2, $3, 'reserved', $4, $5)"
            ))
            .bind(e.generation_id)
            .bind(e.account_id)
            .bind(e.amount)
            .bind(e.hold_expires_at)
            .bind(recorded_at)
            .execute(&mut *conn)
            .await?;
            for d in &e.draws {
                sqlx::query(trusted_sql!(
                    "insert into {p}credit_reservation_draws (generation_id, bucket_id, amount) values ($1, $2, $3)"
                ))
                .bind(e.generation_id)
                .bind(d.bucket_id)
                .bind(d.amount)
                .execute(&mut *conn)
                .await?;
                sqlx::query(trusted_sql!(
                    "update {p}credit_buckets set remaining = remaining - $2, reserved = reserved + $2
                      where bucket_id = $1"
                ))
                .bind(d.bucket_id)
                .bind(d.amount)
                .execute(&mut *conn)
                .await?;
            }
            sqlx::query(trusted_sql!(
                "update {p}credit_accounts set available = available - $2, reserved = reserved + $2
                  where account_id = $1"
            ))
            .bind(e.account_id)
            .bind(e.amount)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::CreditsCaptured(e) => {
            sqlx::query(trusted_sql!(
                "update {p}credit_reservations set status = 'captured', resolved_at = $2
                  where generation_id = $1"
            ))
            .bind(e.generation_id)
            .bind(recorded_at)
            .execute(&mut *conn)
            .await?;
            // Claims first: a bucket's claim never exceeds what it holds.
            for d in &e.owed {
                sqlx::query(trusted_sql!(
                    "update {p}credit_buckets set revoked_held = revoked_held - $2 where bucket_id = $1"
                ))
                .bind(d.bucket_id)
                .bind(d.amount)
                .execute(&mut *conn)
                .await?;
            }
            sqlx::query(trusted_sql!(
                "update {p}credit_buckets cb set reserved = cb.reserved - d.amount, consumed = cb.consumed + d.amount
                   from {p}credit_reservation_draws d
                  where d.generation_id = $1 and cb.bucket_id = d.bucket_id"
            ))
            .bind(e.generation_id)
            .execute(&mut *conn)
            .await?;
            for d in &e.settled {
                sqlx::query(trusted_sql!(
                    "update {p}credit_buckets set remaining = remaining - $2 where bucket_id = $1"
                ))
                .bind(d.bucket_id)
                .bind(d.amount)
                .execute(&mut *conn)
                .await?;
            }
            sqlx::query(trusted_sql!(
                "update {p}credit_accounts set reserved = reserved - $2, total_captured = total_captured + $2,
                        available = available - $4, debt = debt + $3 - $4,
                        total_debt_added = total_debt_added + $3, total_debt_settled = total_debt_settled + $4
                  where account_id = $1"
            ))
            .bind(e.account_id)
            .bind(e.amount)
            .bind(e.owed_total())
            .bind(e.settled_total())
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::CreditsReleased(e) => {
            let (mut restored, mut lapsed, mut settled, mut revoked) = (0, 0, 0, 0);
            for d in &e.draws {
                sqlx::query(trusted_sql!(
                    "update {p}credit_buckets
                        set reserved = reserved - $2, remaining = remaining + $3, lapsed = lapsed + $4,
                            revoked_held = revoked_held - $5
                      where bucket_id = $1"
                ))
                .bind(d.bucket_id)
                .bind(d.amount)
                .bind(d.restored)
                .bind(d.lapsed)
                .bind(d.revoked)
                .execute(&mut *conn)
                .await?;
                restored += d.restored;
                lapsed += d.lapsed;
                settled += d.debt_settled;
                revoked += d.revoked;
            }
            sqlx::query(trusted_sql!(
                "update {p}credit_reservations set status = 'released', resolved_at = $2, release_reason = $3
                  where generation_id = $1"
            ))
            .bind(e.generation_id)
            .bind(recorded_at)
            .bind(&e.reason)
            .execute(&mut *conn)
            .await?;
            sqlx::query(trusted_sql!(
                "update {p}credit_accounts
                    set reserved = reserved - $2, available = available + $3, debt = debt - $4,
                        total_lapsed = total_lapsed + $5, total_debt_settled = total_debt_settled + $4,
                        total_revoked = total_revoked + $6
                  where account_id = $1"
            ))
            .bind(e.account_id)
            .bind(e.amount)
            .bind(restored)
            .bind(settled)
            .bind(lapsed)
            .bind(revoked)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::CreditsRevoked(e) => {
            sqlx::query(trusted_sql!(
                "update {p}credit_buckets
                    set remaining = remaining - $2, revoked = revoked + $3, revoked_lapsed = revoked_lapsed + $4,
                        revoked_held = revoked_held + $5
                  where bucket_id = $1"
            ))
            .bind(e.bucket_id)
            .bind(e.taken)
            .bind(e.amount)
            .bind(e.from_lapsed)
            .bind(e.held)
            .execute(&mut *conn)
            .await?;
            sqlx::query(trusted_sql!(
                "update {p}credit_accounts
                    set available = available - $2, debt = debt + $3, total_revoked = total_revoked + $2,
                        total_debt_added = total_debt_added + $3
                  where account_id = $1"
            ))
            .bind(e.account_id)
            .bind(e.taken)
            .bind(e.debt_added)
            .execute(&mut *conn)
            .await?;
            sqlx::query(trusted_sql!(
                "insert into {p}credit_revocations (revoke_key, account_id, bucket_id, amount, taken,
                    from_lapsed, held, debt_added, revoked_at) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ))
            .bind(&e.revoke_key)
            .bind(e.account_id)
            .bind(e.bucket_id)
            .bind(e.amount)
            .bind(e.taken)
            .bind(e.from_lapsed)
            .bind(e.held)
            .bind(e.debt_added)
            .bind(recorded_at)
            .execute(&mut *conn)
            .await?;
        }
        DomainEvent::CreditsExpired(e) => {
            sqlx::query(trusted_sql!(
                "update {p}credit_buckets set expired = true, lapsed = lapsed + $2, remaining = remaining - $2
                  where bucket_id = $1"
            ))
            .bind(e.bucket_id)
            .bind(e.amount)
            .execute(&mut *conn)
            .await?;
            sqlx::query(trusted_sql!(
                "update {p}credit_accounts set available = available - $2, total_lapsed = total_lapsed + $2
                  where account_id = $1"
            ))
            .bind(e.account_id)
            .bind(e.amount)
            .execute(&mut *conn)
            .await?;
        }
        _ => {}
    }
    Ok(())
}
