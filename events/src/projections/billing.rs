//! Inline projection `billing`: Stripe customers ↔ accounts, subscription
//! state, past-due status. States carry the time they describe (`state_at`,
//! the Stripe event's `created`); an older state never overwrites a newer
//! one, so arrival order does not matter.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Table;
use crate::Error;
use crate::catalog::DomainEvent;

pub const TABLES: &[Table] = &[
    Table {
        name: "stripe_customers",
        columns: "customer_id, account_id, linked_at",
    },
    Table {
        name: "stripe_subscriptions",
        columns: "subscription_id, account_id, customer_id, status, price_id, current_period_start, \
                  current_period_end, cancel_at_period_end, canceled_at, state_at",
    },
    Table {
        name: "billing_accounts",
        columns: "account_id, past_due, invoice_id, state_at",
    },
];

pub const EVENT_TYPES: &[&str] = &[
    "StripeCustomerLinked",
    "SubscriptionStateChanged",
    "BillingStatusChanged",
];

pub async fn apply(
    conn: &mut PgConnection,
    prefix: &str,
    event: &DomainEvent,
    recorded_at: DateTime<Utc>,
) -> Result<(), Error> {
    let p = prefix;
    match event {
        DomainEvent::StripeCustomerLinked(e) => {
            sqlx::query(trusted_sql!(
                "insert into {p}stripe_customers (customer_id, account_id, linked_at) values ($1, $2, $3)
                 on conflict (customer_id) do nothing"
            ))
            .bind(&e.customer_id)
            .bind(e.account_id)
            .bind(recorded_at)
            .execute(conn)
            .await?;
        }
        DomainEvent::SubscriptionStateChanged(e) => {
            // Newer wins; at the same instant a cancellation wins.
            sqlx::query(trusted_sql!(
                "insert into {p}stripe_subscriptions as s (subscription_id, account_id, customer_id, status,
                    price_id, current_period_start, current_period_end, cancel_at_period_end, canceled_at, state_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 on conflict (subscription_id) do update set
                    account_id = excluded.account_id, customer_id = excluded.customer_id,
                    status = excluded.status, price_id = excluded.price_id,
                    current_period_start = excluded.current_period_start,
                    current_period_end = excluded.current_period_end,
                    cancel_at_period_end = excluded.cancel_at_period_end,
                    canceled_at = excluded.canceled_at, state_at = excluded.state_at
                 where excluded.state_at > s.state_at
                    or (excluded.state_at = s.state_at and excluded.status = 'canceled' and s.status <> 'canceled')"
            ))
            .bind(&e.subscription_id)
            .bind(e.account_id)
            .bind(&e.customer_id)
            .bind(&e.status)
            .bind(&e.price_id)
            .bind(e.current_period_start)
            .bind(e.current_period_end)
            .bind(e.cancel_at_period_end)
            .bind(e.canceled_at)
            .bind(e.state_at)
            .execute(conn)
            .await?;
        }
        DomainEvent::BillingStatusChanged(e) => {
            // Newer wins; at the same instant a payment wins over a failure.
            sqlx::query(trusted_sql!(
                "insert into {p}billing_accounts as b (account_id, past_due, invoice_id, state_at)
                 values ($1, $2, $3, $4)
                 on conflict (account_id) do update set
                    past_due = excluded.past_due, invoice_id = excluded.invoice_id, state_at = excluded.state_at
                 where excluded.state_at > b.state_at
                    or (excluded.state_at = b.state_at and not excluded.past_due and b.past_due)"
            ))
            .bind(e.account_id)
            .bind(e.past_due)
            .bind(&e.invoice_id)
            .bind(e.state_at)
            .execute(conn)
            .await?;
        }
        _ => {}
    }
    Ok(())
}
