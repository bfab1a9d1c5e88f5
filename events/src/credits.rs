//! The two-phase credit ledger. The decisions are made by stored functions
//! (migrations/…_accounts_and_credits.sql) that lock the account row, check,
//! append the event and update the balance in the caller's transaction; these
//! are their typed front doors.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Error;
use crate::catalog::{GrantSource, Metadata};

#[derive(Debug, Clone)]
pub struct Grant {
    pub account_id: Uuid,
    pub amount: i64,
    pub source: GrantSource,
    /// Idempotency key: granting twice with the same key grants once.
    pub grant_key: String,
    pub stripe_object: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantOutcome {
    /// `granted` or `duplicate`.
    pub outcome: String,
    pub bucket_id: Uuid,
    pub amount: i64,
    pub debt_settled: i64,
}

impl GrantOutcome {
    /// True when this call made the grant (not a duplicate of an earlier one).
    pub fn took_effect(&self) -> bool {
        self.outcome == "granted"
    }
}

#[tracing::instrument(skip_all, fields(account_id = %grant.account_id, amount = grant.amount))]
pub async fn grant(
    conn: &mut PgConnection,
    grant: &Grant,
    metadata: &Metadata,
) -> Result<GrantOutcome, Error> {
    let v: Value = sqlx::query_scalar("select credit_grant($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(grant.account_id)
        .bind(grant.amount)
        .bind(grant.source.as_str())
        .bind(&grant.grant_key)
        .bind(&grant.stripe_object)
        .bind(grant.expires_at)
        .bind(&grant.reason)
        .bind(metadata.to_json())
        .fetch_one(conn)
        .await?;
    decode(v)
}

/// The result of a reservation attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    Reserved {
        amount: i64,
        available: i64,
    },
    /// The generation already holds this reservation (in `status`).
    Duplicate {
        status: String,
        amount: i64,
    },
    Insufficient {
        available: i64,
        shortfall: i64,
    },
}

#[tracing::instrument(skip_all, fields(%account_id, %generation_id, amount))]
pub async fn reserve(
    conn: &mut PgConnection,
    account_id: Uuid,
    generation_id: Uuid,
    amount: i64,
    hold_until: DateTime<Utc>,
    now: DateTime<Utc>,
    metadata: &Metadata,
) -> Result<Reservation, Error> {
    let v: Value = sqlx::query_scalar("select credit_reserve($1, $2, $3, $4, $5, $6)")
        .bind(account_id)
        .bind(generation_id)
        .bind(amount)
        .bind(hold_until)
        .bind(now)
        .bind(metadata.to_json())
        .fetch_one(conn)
        .await?;
    let int = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or_default();
    Ok(match v.get("outcome").and_then(Value::as_str) {
        Some("reserved") => Reservation::Reserved {
            amount: int("amount"),
            available: int("available"),
        },
        Some("duplicate") => Reservation::Duplicate {
            status: v["status"].as_str().unwrap_or_default().to_owned(),
            amount: int("amount"),
        },
        _ => Reservation::Insufficient {
            available: int("available"),
            shortfall: int("shortfall"),
        },
    })
}

/// What a capture or release did. A second call is a no-op that reports the
/// earlier outcome (`already_captured` / `already_released`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub outcome: String,
    pub status: String,
    pub amount: i64,
}

impl Resolution {
    /// True when this call changed the reservation.
    pub fn took_effect(&self) -> bool {
        !self.outcome.starts_with("already_")
    }
}

#[tracing::instrument(skip_all, fields(%generation_id))]
pub async fn capture(
    conn: &mut PgConnection,
    generation_id: Uuid,
    metadata: &Metadata,
) -> Result<Resolution, Error> {
    let v: Value = sqlx::query_scalar("select credit_capture($1, $2)")
        .bind(generation_id)
        .bind(metadata.to_json())
        .fetch_one(conn)
        .await?;
    decode(v)
}

#[tracing::instrument(skip_all, fields(%generation_id, reason))]
pub async fn release(
    conn: &mut PgConnection,
    generation_id: Uuid,
    reason: &str,
    metadata: &Metadata,
) -> Result<Resolution, Error> {
    let v: Value = sqlx::query_scalar("select credit_release($1, $2, $3)")
        .bind(generation_id)
        .bind(reason)
        .bind(metadata.to_json())
        .fetch_one(conn)
        .await?;
    decode(v)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeOutcome {
    /// `revoked`, `duplicate` or `nothing_to_revoke`.
    pub outcome: String,
    pub amount: i64,
    pub taken: i64,
    pub from_lapsed: i64,
    /// Held by generations: taken back if they are released, owed if captured.
    pub held: i64,
    pub debt_added: i64,
}

/// Take back `amount` credits of one grant (refund, lost dispute).
#[tracing::instrument(skip_all, fields(%account_id, %bucket_id, amount))]
pub async fn revoke(
    conn: &mut PgConnection,
    account_id: Uuid,
    bucket_id: Uuid,
    amount: i64,
    revoke_key: &str,
    reason: Option<&str>,
    metadata: &Metadata,
) -> Result<RevokeOutcome, Error> {
    let v: Value = sqlx::query_scalar("select credit_revoke($1, $2, $3, $4, $5, $6)")
        .bind(account_id)
        .bind(bucket_id)
        .bind(amount)
        .bind(revoke_key)
        .bind(reason)
        .bind(metadata.to_json())
        .fetch_one(conn)
        .await?;
    decode(v)
}

/// Lapse every bucket past its expiry at `now`. Returns how many lapsed.
pub async fn expire(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<i32, Error> {
    Ok(sqlx::query_scalar("select credit_expire($1)")
        .bind(now)
        .fetch_one(conn)
        .await?)
}

/// Release reservations whose hold ended before `now`. Returns how many.
pub async fn release_stale_holds(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<i32, Error> {
    Ok(sqlx::query_scalar("select credit_release_stale_holds($1)")
        .bind(now)
        .fetch_one(conn)
        .await?)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Bucket {
    pub bucket_id: Uuid,
    pub source: String,
    pub stripe_object: Option<String>,
    pub amount: i64,
    pub remaining: i64,
    pub reserved: i64,
    pub consumed: i64,
    pub lapsed: i64,
    pub revoked: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub expired: bool,
    pub granted_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Balance {
    pub account_id: Uuid,
    pub available: i64,
    pub reserved: i64,
    pub debt: i64,
    pub buckets: Vec<Bucket>,
}

/// Available, reserved, debt, and every bucket with what is left in it.
///
/// One statement: the totals and the buckets are read in one round trip and
/// from one snapshot (two reads in read committed could see a draw between
/// them, the totals before it and the buckets after). An account with no
/// bucket is one row with none.
pub async fn balance(conn: &mut PgConnection, account_id: Uuid) -> Result<Balance, Error> {
    use sqlx::{FromRow, Row};
    let rows = sqlx::query(
        "select a.available, a.reserved as account_reserved, a.debt,
                b.bucket_id, b.source, b.stripe_object, b.amount, b.remaining, b.reserved,
                b.consumed, b.lapsed, b.revoked, b.expires_at, b.expired, b.granted_at
           from credit_accounts a
           left join credit_buckets b on b.account_id = a.account_id
          where a.account_id = $1
          order by b.expires_at asc nulls last, b.granted_position asc",
    )
    .bind(account_id)
    .fetch_all(&mut *conn)
    .await?;
    let first = rows.first().ok_or(Error::UnknownAccount(account_id))?;
    let (available, reserved, debt) = (
        first.try_get("available")?,
        first.try_get("account_reserved")?,
        first.try_get("debt")?,
    );
    let mut buckets = Vec::with_capacity(rows.len());
    for row in &rows {
        if row.try_get::<Option<Uuid>, _>("bucket_id")?.is_some() {
            buckets.push(Bucket::from_row(row)?);
        }
    }
    Ok(Balance {
        account_id,
        available,
        reserved,
        debt,
        buckets,
    })
}

/// The bucket a Stripe object (checkout session, invoice, charge) granted.
pub async fn bucket_for_stripe_object(
    conn: &mut PgConnection,
    account_id: Uuid,
    stripe_object: &str,
) -> Result<Option<Uuid>, Error> {
    Ok(sqlx::query_scalar(
        "select bucket_id from credit_buckets where account_id = $1 and stripe_object = $2
          order by granted_position limit 1",
    )
    .bind(account_id)
    .bind(stripe_object)
    .fetch_optional(conn)
    .await?)
}

fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::Decode {
        event_type: "ledger outcome".into(),
        schema_version: 1,
        reason: e.to_string(),
    })
}

/// One credit movement of an account (from the `credit_ledger` projection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct LedgerEntry {
    pub position: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub generation_id: Option<Uuid>,
    pub bucket_id: Option<Uuid>,
    /// Change of the available balance.
    pub available: i64,
    pub reserved: i64,
    pub debt: i64,
    pub at: DateTime<Utc>,
}

/// The account's movements, newest first, before `cursor` (a position).
pub async fn ledger_page(
    conn: &mut PgConnection,
    account_id: Uuid,
    cursor: Option<i64>,
    limit: i64,
) -> Result<Vec<LedgerEntry>, Error> {
    Ok(sqlx::query_as(
        "select global_position as position, event_type, generation_id, bucket_id,
                delta_available as available, delta_reserved as reserved, delta_debt as debt,
                recorded_at as at
           from credit_ledger_entries
          where account_id = $1 and ($2::bigint is null or global_position < $2)
          order by global_position desc limit $3",
    )
    .bind(account_id)
    .bind(cursor)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
