//! The purge of a deleted account once its grace period is over
//! (`slate.purge`, scheduled by the maintenance sweep):
//!
//! 1. `stripe`: cancel its live Stripe subscriptions at once;
//! 2. `storage`: delete every object under `users/<account>/`;
//! 3. `farewell_email`: tell the user it is done (while the address exists);
//! 4. in one transaction: delete the private rows (prompts, idempotency
//!    records, second factor, webhook secret), redact names, emails and
//!    addresses in the mirrored Stripe events, erase the data key (every
//!    sealed field in the log becomes unreadable) and append `AccountPurged`,
//!    whose projections drop sessions, keys and generations and the email.
//!
//! Each of 1–3 is recorded (`AccountPurgeStepCompleted`) and skipped on a
//! re-run, and is itself safe to repeat: a crash between doing a step and
//! recording it repeats the step, and Stripe is asked for the subscription's
//! state before a cancel (and the cancel carries an idempotency key), so a
//! subscription is canceled once. Credits, billing and the audit trail stay:
//! the books of the whole system do not change.

use std::sync::Arc;

use apalis::prelude::{Attempt, BoxDynError, Data, TaskId};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use slate_events::catalog::{AccountPurgeStepCompleted, AccountPurged, DomainEvent};
use slate_events::store;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::email::{self, Mailer, Template};
use crate::jobs;
use crate::storage::Storage;

pub const QUEUE: &str = "slate.purge";
pub const MAX_ATTEMPTS: usize = 20;

/// What Stripe said to a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    Canceled,
    AlreadyCanceled,
    /// Stripe does not know the subscription (deleted with its customer).
    Missing,
}

/// Cancels one subscription at once, checking its state first (the binary
/// implements it over async-stripe).
pub type SubscriptionCanceller =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<Cancel, String>> + Send + Sync>;

#[derive(Clone)]
pub struct Purger {
    pub pool: PgPool,
    pub storage: Storage,
    pub mailer: Option<Mailer>,
    pub stripe: Option<SubscriptionCanceller>,
    /// Fault injection for crash tests (never set in production): fail
    /// right after this step's side effect, before it is recorded.
    pub crash_after: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Purged,
    AlreadyPurged,
    /// Not deleted, restored, or its grace period is not over.
    NotDue,
    UnknownAccount,
}

#[derive(Debug, thiserror::Error)]
#[error("fault injected after the {0} step")]
pub struct InjectedCrash(pub &'static str);

/// Purge `account_id` if it is due at `now` (injected by tests).
#[tracing::instrument(skip_all, fields(%account_id))]
pub async fn purge(p: &Purger, account_id: Uuid, now: DateTime<Utc>) -> anyhow::Result<Outcome> {
    // Held for the whole purge: one purge of an account at a time, and a
    // restore waits for it (and then finds nothing to restore). An advisory
    // lock, so that this transaction has no id while the steps below wait on
    // Stripe, S3 and the email API (minutes, for an account with many
    // objects): the account row's lock gave it one, which held back every
    // asynchronous projector for as long. The row is locked for the erase.
    let mut lock = p.pool.begin().await?;
    sqlx::query(slate_events::accounts::PURGE_LOCK)
        .bind(account_id)
        .execute(&mut *lock)
        .await?;
    if let Some(not_due) = due(&mut lock, account_id, now, "").await? {
        return Ok(not_due);
    }
    let done: Vec<String> = sqlx::query_scalar(concat!(
        "select payload->>'step' from (",
        slate_events::purge_steps_of_deletion!(),
        ") s"
    ))
    .bind(store::account_stream(account_id))
    .fetch_all(&p.pool)
    .await?;

    if !done.iter().any(|s| s == "stripe") {
        let detail = cancel_subscriptions(p, account_id).await?;
        p.step_done(account_id, "stripe", detail).await?;
    }
    if !done.iter().any(|s| s == "storage") {
        let deleted = p
            .storage
            .delete_prefix(&crate::storage::account_prefix(account_id))
            .await?;
        p.crash_point("storage")?;
        p.step_done(account_id, "storage", format!("deleted {deleted} objects"))
            .await?;
    }
    if !done.iter().any(|s| s == "farewell_email") {
        let outcome = email::deliver(
            &p.pool,
            p.mailer.as_ref(),
            account_id,
            Template::DeletionCompleted,
            &format!("purge-{account_id}"),
        )
        .await;
        // A message the email API refuses (an address it will not send to,
        // a key or domain it does not accept) will not be sent by trying
        // again: the purge goes on without it. Stopped there, it never
        // erased anything, however often it was rescheduled. A failure
        // worth another try (network, 429, 5xx) retries the purge.
        let detail = match outcome {
            Ok(email::Outcome::Sent(_)) => "sent".to_owned(),
            Ok(email::Outcome::Skipped(why)) => format!("not sent: {why}"),
            Err(e) => match e.downcast_ref::<email::SendError>() {
                Some(&email::SendError::Refused(status)) => {
                    tracing::warn!(status, "the farewell email was refused; purging without it");
                    format!("not sent: refused by the email API (HTTP {status})")
                }
                _ => return Err(e),
            },
        };
        p.step_done(account_id, "farewell_email", detail).await?;
    }

    // Read again under the row's lock: an account deleted and due is not
    // restored while a purge holds its lock, but the row is what the
    // deletion and every other writer of it wait for.
    if let Some(not_due) = due(&mut lock, account_id, now, " for update").await? {
        return Ok(not_due);
    }
    erase(&mut lock, account_id).await?;
    lock.commit().await?;
    tracing::info!("account purged");
    Ok(Outcome::Purged)
}

/// Why `account_id` is not to be purged at `now`, if it is not; its row
/// read with `lock` (`""` or `" for update"`).
async fn due(
    conn: &mut PgConnection,
    account_id: Uuid,
    now: DateTime<Utc>,
    lock: &'static str,
) -> anyhow::Result<Option<Outcome>> {
    type Times = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);
    let row: Option<Times> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select purge_after, purged_at from accounts where account_id = $1{lock}"
    )))
    .bind(account_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        None => Some(Outcome::UnknownAccount),
        Some((_, Some(_))) => Some(Outcome::AlreadyPurged),
        Some((Some(after), None)) if after <= now => None,
        Some(_) => Some(Outcome::NotDue),
    })
}

/// Step 4, in the lock's transaction.
async fn erase(conn: &mut PgConnection, account_id: Uuid) -> anyhow::Result<()> {
    sqlx::query(
        "delete from generation_inputs
          where generation_id in (select generation_id from generations where account_id = $1)",
    )
    .bind(account_id)
    .execute(&mut *conn)
    .await?;
    for table in [
        "idempotency_keys",
        "totp_secrets",
        "webhook_secrets",
        "generation_turns",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "delete from {table} where account_id = $1"
        )))
        .bind(account_id)
        .execute(&mut *conn)
        .await?;
    }
    slate_events::stripe::redact_personal_details(conn, account_id).await?;
    slate_events::vault::erase(conn, account_id).await?;
    store::record_once(
        conn,
        account_id,
        &format!("account-purged:{account_id}"),
        DomainEvent::AccountPurged(AccountPurged { account_id }),
    )
    .await?;
    Ok(())
}

/// The account's subscriptions that have not ended, as mirrored from
/// Stripe, in id order.
pub async fn live_subscriptions(
    conn: &mut PgConnection,
    account_id: Uuid,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "select subscription_id from stripe_subscriptions
          where account_id = $1 and status not in ('canceled', 'incomplete_expired')
          order by subscription_id",
    )
    .bind(account_id)
    .fetch_all(conn)
    .await
}

async fn cancel_subscriptions(p: &Purger, account_id: Uuid) -> anyhow::Result<String> {
    let live = live_subscriptions(&mut *p.pool.acquire().await?, account_id).await?;
    if live.is_empty() {
        return Ok("no live subscription".into());
    }
    let Some(stripe) = &p.stripe else {
        anyhow::bail!("the account has live Stripe subscriptions and Stripe is not configured");
    };
    let mut said = Vec::new();
    for id in live {
        let outcome = stripe(id.clone())
            .await
            .map_err(|e| anyhow::anyhow!("canceling a subscription: {e}"))?;
        p.crash_point("stripe")?;
        said.push(format!(
            "{id} {}",
            match outcome {
                Cancel::Canceled => "canceled",
                Cancel::AlreadyCanceled => "already canceled",
                Cancel::Missing => "unknown to Stripe",
            }
        ));
    }
    Ok(said.join(", "))
}

impl Purger {
    fn crash_point(&self, step: &'static str) -> Result<(), InjectedCrash> {
        match self.crash_after {
            Some(s) if s == step => Err(InjectedCrash(step)),
            _ => Ok(()),
        }
    }

    async fn step_done(&self, account_id: Uuid, step: &str, detail: String) -> anyhow::Result<()> {
        let mut conn = self.pool.acquire().await?;
        store::record_once(
            &mut conn,
            account_id,
            &format!("purge-step:{account_id}:{step}"),
            DomainEvent::AccountPurgeStepCompleted(AccountPurgeStepCompleted {
                account_id,
                step: step.into(),
                detail,
            }),
        )
        .await?;
        tracing::info!(step, "purge step done");
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PurgeJob {
    pub account_id: Uuid,
}

/// Enqueue the purge of every account whose grace period ended by `now`
/// (one job per account: a queued or running one is left alone).
pub async fn schedule_due(pool: &PgPool, now: DateTime<Utc>) -> anyhow::Result<usize> {
    let due: Vec<Uuid> = sqlx::query_scalar(
        "select account_id from accounts
          where deleted_at is not null and purged_at is null and purge_after <= $1",
    )
    .bind(now)
    .fetch_all(pool)
    .await?;
    let mut enqueued = 0;
    for account_id in due {
        let key = format!("purge:{account_id}");
        if jobs::enqueue_once(pool, QUEUE, &PurgeJob { account_id }, MAX_ATTEMPTS, &key).await? {
            enqueued += 1;
        }
    }
    Ok(enqueued)
}

#[tracing::instrument(level = "error", skip_all, fields(job_id = %task_id, account_id = %job.account_id, attempt = attempt.current()))]
pub async fn handle(
    job: PurgeJob,
    task_id: TaskId,
    attempt: Attempt,
    purger: Data<Purger>,
) -> Result<(), BoxDynError> {
    jobs::contain(async move {
        match purge(&purger, job.account_id, Utc::now()).await {
            Ok(outcome) => {
                tracing::info!(?outcome, "purge job finished");
                Ok(())
            }
            Err(e) => {
                let delay = jobs::backoff(attempt.current());
                tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "purge will be resumed");
                jobs::retry_later(&purger.pool, &task_id.to_string(), delay).await?;
                Err(e.into())
            }
        }
    })
    .await
}
