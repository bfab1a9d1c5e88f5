//! A deleted account's Stripe subscriptions stop renewing, and a restored
//! account's start again (`slate.renewal`).
//!
//! The purge cancels them 30 days after the deletion; until then a renewal
//! would charge the card and credit an account its owner can no longer
//! reach. So a deletion enqueues a job, in its own transaction, that sets
//! each live subscription to end at its period's end, marking it as set by
//! the deletion (`metadata.slate_renewal`); a restore enqueues one that
//! undoes exactly that. A subscription its owner had already set to end is
//! left as it was, and stays so after a restore.
//!
//! The job reads what the account is when it runs, not what it was when it
//! was enqueued, one job of an account at a time: deleted, restored and
//! deleted again in a minute ends set to end, whatever order the jobs were
//! picked up in. Each subscription's outcome is recorded
//! (`SubscriptionRenewalChanged`), and Stripe is asked for a subscription's
//! state before it is changed (the change carries an idempotency key), so a
//! job run again after a crash changes nothing twice. A subscription Stripe
//! will not change (an `incomplete` one, say) is recorded as such and does
//! not hold up the others.

use std::sync::Arc;

use apalis::prelude::{Attempt, BoxDynError, Data, TaskId};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use slate_events::catalog::{DomainEvent, SubscriptionRenewalChanged};
use slate_events::store;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::jobs;

pub const QUEUE: &str = "slate.renewal";
pub const MAX_ATTEMPTS: usize = 12;
/// How long the maintenance sweep leaves an account whose renewal job gave
/// up before it enqueues another ([`schedule_missing`]). A job's attempts
/// span about 50 minutes: an error that outlasts them (a revoked key, an
/// answer it cannot read) would otherwise start a new job every hour, each
/// of twelve calls to Stripe, for as long as it lasts.
pub const AFTER_A_DEAD_JOB: chrono::TimeDelta = chrono::TimeDelta::hours(6);

/// The metadata key, and its value, that mark a subscription as set to end
/// by its account's deletion.
pub const MARK_KEY: &str = "slate_renewal";
pub const MARK_VALUE: &str = "stopped_for_account_deletion";
/// The metadata key that keeps the date its owner had set a subscription to
/// cancel at (after the period the deletion ended it at), for a restore.
pub const OWNERS_DATE_KEY: &str = "slate_renewal_owner_cancel_at";
/// The metadata key that names the unpaid invoice whose automatic
/// collection the deletion paused (a `past_due` subscription's), for a
/// restore.
pub const PAUSED_INVOICE_KEY: &str = "slate_renewal_paused_invoice";

/// What the account's subscriptions should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// End at the period's end (the account is deleted).
    Stop,
    /// Renew again, if the deletion stopped it (the account is restored).
    Resume,
}

/// What became of one subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Stripe changed it.
    Done,
    /// Nothing to change, and why.
    Unchanged(&'static str),
    /// Stripe refused the change (a 4xx other than 409 and 429): asking
    /// again would not help, and the account's other subscriptions go on.
    Refused(u16),
}

/// Sets one subscription's renewal as wanted, reading its state first (the
/// binary implements it over async-stripe). The last argument is the
/// idempotency key for the change. An `Err` is worth another try (Stripe
/// out of reach, a 5xx, 409, 429).
pub type RenewalSetter =
    Arc<dyn Fn(String, Want, String) -> BoxFuture<'static, Result<Changed, String>> + Send + Sync>;

#[derive(Clone)]
pub struct Renewals {
    pub pool: PgPool,
    pub stripe: Option<RenewalSetter>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RenewalJob {
    pub account_id: Uuid,
}

/// Enqueue the account's renewal job in the caller's transaction (the one
/// that deletes or restores it); [`jobs::Wake::send`] after the commit.
pub async fn enqueue(
    conn: &mut PgConnection,
    account_id: Uuid,
) -> Result<jobs::Wake, apalis_postgres::Error> {
    jobs::enqueue(conn, QUEUE, &RenewalJob { account_id }, MAX_ATTEMPTS).await
}

/// Bring the account's live subscriptions in line with what the account is
/// now. `job` names the job (its id): a re-run of the same job records
/// nothing twice; `attempt` makes each attempt's idempotency keys its own
/// (Stripe answers a key with its first answer for a day, a 500 included).
/// Every subscription is tried; a failure worth another try fails the run
/// after the others are done. Returns what became of each subscription.
#[tracing::instrument(skip_all, fields(%account_id))]
pub async fn reconcile(
    r: &Renewals,
    account_id: Uuid,
    job: &str,
    attempt: usize,
) -> anyhow::Result<Vec<(String, Changed)>> {
    // Held until every subscription is done: one run per account at a time,
    // each reading the account's state after the previous run finished.
    let mut lock = r.pool.begin().await?;
    sqlx::query("select pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("{QUEUE}/{account_id}"))
        .execute(&mut *lock)
        .await?;
    let state: Option<(bool, bool)> = sqlx::query_as(
        "select deleted_at is not null, purged_at is not null from accounts where account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(&mut *lock)
    .await?;
    let want = match state {
        // Unknown, or purged (the purge canceled them).
        None | Some((_, true)) => return Ok(Vec::new()),
        Some((true, false)) => Want::Stop,
        Some((false, false)) => Want::Resume,
    };
    let live = crate::purge::live_subscriptions(&mut lock, account_id).await?;
    if live.is_empty() {
        return Ok(Vec::new());
    }
    let stripe = r.stripe.as_ref();
    if stripe.is_none() {
        tracing::error!(
            "the account has live Stripe subscriptions and Stripe is not configured here; they are left as they are"
        );
    }
    let direction = match want {
        Want::Stop => "stop",
        Want::Resume => "resume",
    };
    let mut outcomes = Vec::new();
    let mut failed = None;
    for id in live {
        let key = format!("slate-renewal-{job}-{attempt}-{direction}-{id}");
        let changed = match stripe {
            None => Ok(Changed::Unchanged("Stripe is not configured here")),
            Some(stripe) => stripe(id.clone(), want, key).await,
        };
        let changed = match changed {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(subscription = %id, error = %e, "setting a subscription's renewal failed");
                failed = Some(e);
                continue;
            }
        };
        let detail = match (&changed, want) {
            (Changed::Done, Want::Stop) => "set to end at the period's end".to_owned(),
            (Changed::Done, Want::Resume) => "set to renew again".to_owned(),
            (Changed::Unchanged(why), _) => (*why).to_owned(),
            (Changed::Refused(status), _) => format!("Stripe refused the change (HTTP {status})"),
        };
        let mut conn = r.pool.acquire().await?;
        store::record_once(
            &mut conn,
            account_id,
            &format!("renewal:{job}:{direction}:{id}"),
            DomainEvent::SubscriptionRenewalChanged(SubscriptionRenewalChanged {
                account_id,
                subscription_id: id.clone(),
                renews: want == Want::Resume,
                changed: changed == Changed::Done,
                detail: detail.clone(),
            }),
        )
        .await?;
        tracing::info!(subscription = %id, %detail, "subscription renewal reconciled");
        outcomes.push((id, changed));
    }
    if let Some(e) = failed {
        anyhow::bail!("setting a subscription's renewal: {e}");
    }
    lock.commit().await?;
    Ok(outcomes)
}

/// Enqueue a renewal job (one per account at a time) for every account whose
/// subscriptions were left as they should not be (run by the maintenance
/// sweep): a deleted account with a live subscription that renews and has
/// no outcome recorded since the deletion (an account deleted before this
/// job existed, a subscription mirrored after the job ran, a job that died
/// retrying through a long Stripe outage), and a restored one whose
/// subscription's last outcome is a deletion's. An outcome of any kind in
/// the right direction, a refusal included, is the end of it; an account
/// with a renewal job waiting, running or to be retried is left to it, and
/// one whose last job gave up (no attempt left) less than
/// [`AFTER_A_DEAD_JOB`] before `now` waits for that, unless the
/// subscription's period ends before the wait would be over (a renewal
/// charged, or a restored owner's subscription ended).
pub async fn schedule_missing(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<usize> {
    let due: Vec<Uuid> = sqlx::query_scalar(
        "select distinct s.account_id
           from stripe_subscriptions s join accounts a using (account_id)
           -- the subscription's last outcome
           left join lateral (
               select e.global_position, (e.payload->>'renews')::bool as renews
                 from events e
                where e.stream_id = 'account-' || a.account_id
                  and e.event_type = 'SubscriptionRenewalChanged'
                  and e.payload->>'subscription_id' = s.subscription_id
                order by e.global_position desc limit 1) last on true
          where a.purged_at is null
            and s.status not in ('canceled', 'incomplete_expired', 'incomplete')
            and (a.deleted_at is not null) <> s.cancel_at_period_end
            and case when a.deleted_at is not null
                     -- nothing since the deletion, or a restore's last
                     then last.global_position is null or last.renews
                          or last.global_position < (
                              select max(e.global_position) from events e
                               where e.stream_id = 'account-' || a.account_id
                                 and e.event_type = 'AccountDeletionRequested')
                     -- a deletion's last
                     else not last.renews end
            -- a job of the account's waiting, running or to be retried, or
            -- one that gave up lately
            and not exists (
                select 1 from apalis.jobs j
                 where j.job_type = $1
                   and convert_from(j.job, 'UTF8')::jsonb->>'account_id' = s.account_id::text
                   and (not (j.status in ('Done', 'Killed')
                             or (j.status = 'Failed' and j.attempts >= j.max_attempts))
                        -- unless it renews (or ends) before the wait is over
                        or (j.status <> 'Done' and j.done_at > $2
                            and (s.current_period_end is null or s.current_period_end > $3))))",
    )
    .bind(QUEUE)
    .bind(now - AFTER_A_DEAD_JOB)
    .bind(now + AFTER_A_DEAD_JOB)
    .fetch_all(pool)
    .await?;
    let mut enqueued = 0;
    for account_id in due {
        let key = format!("renewal:{account_id}");
        if jobs::enqueue_once(pool, QUEUE, &RenewalJob { account_id }, MAX_ATTEMPTS, &key).await? {
            enqueued += 1;
        }
    }
    Ok(enqueued)
}

#[tracing::instrument(level = "error", skip_all, fields(job_id = %task_id, account_id = %job.account_id, attempt = attempt.current()))]
pub async fn handle(
    job: RenewalJob,
    task_id: TaskId,
    attempt: Attempt,
    renewals: Data<Renewals>,
) -> Result<(), BoxDynError> {
    jobs::contain(async move {
        match reconcile(
            &renewals,
            job.account_id,
            &task_id.to_string(),
            attempt.current(),
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let delay = jobs::backoff(attempt.current());
                tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "renewal will be retried");
                jobs::retry_later(&renewals.pool, &task_id.to_string(), delay).await?;
                Err(e.into())
            }
        }
    })
    .await
}
