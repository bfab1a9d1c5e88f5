//! Projections of the affiliate programme: `affiliates` (inline: affiliates
//! and referrals) and `affiliate_commissions` (asynchronous: every
//! commission movement; what is owed is their sum).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Table;
use crate::Error;
use crate::catalog::DomainEvent;

pub const INLINE_TABLES: &[Table] = &[
    Table {
        name: "affiliates",
        columns: "affiliate_id, name, referral_code, rate_bps, created_at",
    },
    Table {
        name: "account_referrals",
        columns: "account_id, affiliate_id, referred_at",
    },
];

pub const INLINE_EVENT_TYPES: &[&str] = &["AffiliateCreated", "AccountReferred"];

pub async fn apply_inline(
    conn: &mut PgConnection,
    p: &str,
    event: &DomainEvent,
    recorded_at: DateTime<Utc>,
) -> Result<(), Error> {
    match event {
        DomainEvent::AffiliateCreated(e) => {
            sqlx::query(trusted_sql!(
                "insert into {p}affiliates (affiliate_id, name, referral_code, rate_bps, created_at)
                 values ($1, $2, $3, $4, $5)"
            ))
            .bind(e.affiliate_id)
            .bind(&e.name)
            .bind(&e.referral_code)
            .bind(e.rate_bps)
            .bind(recorded_at)
            .execute(conn)
            .await?;
        }
        DomainEvent::AccountReferred(e) => {
            sqlx::query(trusted_sql!(
                "insert into {p}account_referrals (account_id, affiliate_id, referred_at) values ($1, $2, $3)
                 on conflict (account_id) do nothing"
            ))
            .bind(e.account_id)
            .bind(e.affiliate_id)
            .bind(recorded_at)
            .execute(conn)
            .await?;
        }
        _ => {}
    }
    Ok(())
}

pub const NAME: &str = "affiliate_commissions";

pub const ASYNC_TABLES: &[Table] = &[Table {
    name: "affiliate_commission_entries",
    columns: "global_position, affiliate_id, account_id, kind, stripe_object, currency, amount, recorded_at",
}];

pub const ASYNC_EVENT_TYPES: &[&str] = &[
    "CommissionEarned",
    "CommissionClawedBack",
    "AffiliatePayoutRecorded",
];

pub async fn apply_async(
    conn: &mut PgConnection,
    p: &str,
    event: &DomainEvent,
    position: i64,
    recorded_at: DateTime<Utc>,
) -> Result<(), Error> {
    let (affiliate, account, kind, object, currency, amount) = match event {
        DomainEvent::CommissionEarned(e) => (
            e.affiliate_id,
            Some(e.account_id),
            "earned",
            Some(e.stripe_object.as_str()),
            e.currency.as_str(),
            e.amount,
        ),
        DomainEvent::CommissionClawedBack(e) => (
            e.affiliate_id,
            Some(e.account_id),
            "clawback",
            Some(e.stripe_object.as_str()),
            e.currency.as_str(),
            -e.amount,
        ),
        DomainEvent::AffiliatePayoutRecorded(e) => (
            e.affiliate_id,
            None,
            "payout",
            None,
            e.currency.as_str(),
            -e.amount,
        ),
        _ => return Ok(()),
    };
    sqlx::query(trusted_sql!(
        "insert into {p}affiliate_commission_entries (global_position, affiliate_id, account_id, kind,
            stripe_object, currency, amount, recorded_at) values ($1, $2, $3, $4, $5, $6, $7, $8)"
    ))
    .bind(position)
    .bind(affiliate)
    .bind(account)
    .bind(kind)
    .bind(object)
    .bind(currency)
    .bind(amount)
    .bind(recorded_at)
    .execute(conn)
    .await?;
    Ok(())
}
