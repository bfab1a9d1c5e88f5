//! Accounts: opening one appends `AccountCreated` and fills the inline
//! projections in the same transaction.

use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use crate::Error;
use crate::catalog::{AccountCreated, DomainEvent, Metadata};
use crate::store::{self, ExpectedVersion, NewEvent};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Account {
    pub account_id: Uuid,
    /// None once the account is purged.
    pub email: Option<String>,
    pub staff: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Open an account. The email must be new (case-insensitively).
#[tracing::instrument(skip_all, fields(account_id))]
pub async fn create_account(
    conn: &mut PgConnection,
    email: &str,
    staff: bool,
    metadata: Metadata,
) -> Result<Uuid, Error> {
    let email = email.trim();
    if email.len() < 3 || email.len() > 254 || !email.contains('@') {
        return Err(Error::InvalidArgument("email is not an address".into()));
    }
    let taken: bool =
        sqlx::query_scalar("select exists(select 1 from accounts where lower(email) = lower($1))")
            .bind(email)
            .fetch_one(&mut *conn)
            .await?;
    if taken {
        return Err(Error::EmailTaken);
    }

    let account_id = Uuid::now_v7();
    tracing::Span::current().record("account_id", tracing::field::display(account_id));
    let mut tx = conn.begin().await?;
    // The log keeps the email sealed with the account's own key (see vault).
    let sealed = crate::vault::seal(&mut tx, account_id, email).await?;
    let event = NewEvent::new(
        DomainEvent::AccountCreated(AccountCreated {
            account_id,
            email: sealed,
            staff,
        }),
        metadata,
    );
    match store::append_and_apply(
        &mut tx,
        &store::account_stream(account_id),
        ExpectedVersion::NoStream,
        &event,
    )
    .await
    {
        Ok(_) => {}
        Err(Error::Database(e))
            if e.as_database_error()
                .is_some_and(|d| d.constraint() == Some("accounts_email_idx")) =>
        {
            return Err(Error::EmailTaken);
        }
        Err(e) => return Err(e),
    }
    tx.commit().await?;
    Ok(account_id)
}

pub async fn get_account(
    conn: &mut PgConnection,
    account_id: Uuid,
) -> Result<Option<Account>, Error> {
    Ok(sqlx::query_as(
        "select account_id, email, staff, created_at from accounts where account_id = $1",
    )
    .bind(account_id)
    .fetch_optional(conn)
    .await?)
}

/// One page of an account's events for its export (`GET
/// /v1/account/export`), after log position `$2`, at most `$3`: its own
/// stream's and every event naming it (`payload->>'account_id'`), in log
/// order. What staff or an operator did (a read, an impersonated request, a
/// restore) comes without their address, user agent and key id: those are
/// the staff member's, not the account's, to receive. An affiliate's
/// commission on this account's payments is the affiliate's business (its
/// rate shows in it), not the account's.
///
/// Each half reads its own index (`events_account_idx`, migration
/// `20261206000801`, and the stream's) from the position on, so a page
/// costs what the account's events cost, whatever the size of the log:
/// written as one filter with `or`, PostgreSQL walked the whole log in
/// order and filtered every event.
pub const EXPORT_EVENTS_PAGE: &str = "
    with page as (
        (select global_position from events
          where payload->>'account_id' = $1::text and global_position > $2
            and event_type not in ('CommissionEarned', 'CommissionClawedBack')
          order by global_position limit $3)
        union
        (select global_position from events
          where stream_id = 'account-' || $1::text and global_position > $2
            and event_type not in ('CommissionEarned', 'CommissionClawedBack')
          order by global_position limit $3))
    select jsonb_build_object('position', global_position, 'event_id', event_id, 'stream_id', stream_id,
           'version', stream_version, 'type', event_type, 'schema_version', schema_version,
           'payload', payload,
           'metadata', case when metadata ? 'impersonator'
                              or metadata->'actor'->>'kind' in ('staff', 'operator')
                            then metadata - 'ip' - 'user_agent' - 'api_key_id'
                            else metadata end,
           'recorded_at', recorded_at)
      from page join events using (global_position)
     order by global_position limit $3";

/// [`EXPORT_EVENTS_PAGE`] read, with personal fields opened (the email in
/// `AccountCreated` is sealed in the log); the keyring lives across pages.
pub async fn export_events_page(
    conn: &mut PgConnection,
    keyring: &mut crate::vault::Keyring,
    account_id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<serde_json::Value>, Error> {
    let mut page: Vec<serde_json::Value> = sqlx::query_scalar(EXPORT_EVENTS_PAGE)
        .bind(account_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    for e in &mut page {
        keyring.reveal(&mut *conn, e).await?;
    }
    Ok(page)
}

/// The lock a purge of account `$1` holds from its start to its commit,
/// and a restore takes first, in the caller's transaction: one purge of an
/// account at a time, and a restore waits for the purge under way. An
/// advisory lock, which gives the transaction no id: the purge holds it
/// while it waits on Stripe, S3 and the email API, and a transaction id
/// held that long (as the account row's lock gave it) would hold back
/// every asynchronous projector for as long. Two keys, a space apart from
/// the one-key locks elsewhere, which a collision of hashes would
/// otherwise keep waiting through a purge.
pub const PURGE_LOCK: &str =
    "select pg_advisory_xact_lock(hashtext('account-purge'), hashtext($1::text))";

/// How long a deleted account can still be restored.
pub const GRACE: chrono::Duration = chrono::Duration::days(30);

/// Soft delete: access stops at once (every session and key ends), queued
/// generations are canceled and released, running ones asked to stop; the
/// account is restorable until `purge_after`. Runs in the caller's
/// transaction.
pub async fn request_deletion(
    conn: &mut PgConnection,
    account_id: Uuid,
    now: chrono::DateTime<chrono::Utc>,
    metadata: Metadata,
) -> Result<chrono::DateTime<chrono::Utc>, Error> {
    // Before anything else: a submission in flight holds the row key-share
    // locked until it commits, and is waited for here (see
    // `generations::submit`), so the open generations read below include it.
    // An account already deleted (two requests at once) keeps its date.
    let already: Option<(bool, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
        "select deleted_at is not null, purge_after from accounts where account_id = $1 for update",
    )
    .bind(account_id)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some((true, Some(purge_after))) = already {
        return Ok(purge_after);
    }
    // Then the open generations: queued ones are canceled and released,
    // running ones asked to stop. They are read once the attempts recording
    // their start have done so, and no other can until this commits
    // (`generations::hold_starts`): a worker that read one as queued finds
    // it canceled and does not send its prompt to a provider. Their events
    // are all appended before any credit row is locked: a worker recording
    // an outcome appends it to the generation's stream, then locks the
    // credit row to capture or release, and a deletion that held the credit
    // row while it appended to that stream deadlocked with it.
    crate::generations::hold_starts(conn, account_id).await?;
    let mut canceled = Vec::new();
    for g in crate::generations::unfinished_of(conn, account_id).await? {
        if g.status == "running" {
            crate::generations::request_cancel(conn, &g, &metadata).await?;
        } else if crate::generations::record_canceled(conn, &g, "account_deleted", &metadata)
            .await?
        {
            canceled.push(g.generation_id);
        }
    }
    for id in canceled {
        crate::credits::release(conn, id, "account_deleted", &metadata).await?;
    }
    // Then the credit row, before the account's stream: a worker capturing
    // a generation locks it before appending to that stream; taken the
    // other way round, the two deadlocked.
    sqlx::query("select credit_lock_account($1)")
        .bind(account_id)
        .execute(&mut *conn)
        .await?;
    let purge_after = now + GRACE;
    let event = NewEvent::new(
        DomainEvent::AccountDeletionRequested(crate::catalog::AccountDeletionRequested {
            account_id,
            purge_after,
        }),
        metadata.clone(),
    );
    store::append_and_apply(
        conn,
        &store::account_stream(account_id),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    crate::sessions::end_all(conn, account_id, true, metadata.clone()).await?;
    Ok(purge_after)
}

/// The purge steps recorded since the account's latest deletion request
/// (`AccountPurgeStepCompleted`, their `payload` rows), from the account
/// stream `$1`: the steps of the purge of that deletion. Steps of an
/// earlier deletion, which a restore ended, are not this purge's.
#[macro_export]
macro_rules! purge_steps_of_deletion {
    () => {
        "select payload from events
          where stream_id = $1 and event_type = 'AccountPurgeStepCompleted'
            and stream_version > coalesce(
                (select max(stream_version) from events
                  where stream_id = $1 and event_type = 'AccountDeletionRequested'), 0)"
    };
}

/// What [`restore`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    Restored,
    /// The account exists but is not deleted, or its grace period is over.
    NotRestorable,
    UnknownAccount,
}

/// Restore a soft-deleted account within its grace period (clock injected).
/// Its old sessions and keys stay ended: the user signs in again. A purged
/// account is not restorable, whatever the clock says: the purge runs on
/// another machine's clock, and a restore at the boundary would bring back
/// an account with no address and no data key. Nor is one whose purge has
/// begun ([`purge_steps_of_deletion!`](crate::purge_steps_of_deletion)) and failed before the erase: its
/// media may be gone and its subscriptions canceled, and a later deletion's
/// purge skipped the steps it found done.
pub async fn restore(
    conn: &mut PgConnection,
    account_id: Uuid,
    now: chrono::DateTime<chrono::Utc>,
    metadata: Metadata,
) -> Result<Restore, Error> {
    // A purge under way is waited for (and then there is nothing to restore).
    sqlx::query(PURGE_LOCK)
        .bind(account_id)
        .execute(&mut *conn)
        .await?;
    let row: Option<(Option<chrono::DateTime<chrono::Utc>>, bool)> = sqlx::query_as(
        "select purge_after, purged_at is not null from accounts where account_id = $1 for update",
    )
    .bind(account_id)
    .fetch_optional(&mut *conn)
    .await?;
    let in_grace = matches!(row, Some((Some(purge_after), false)) if now < purge_after);
    if in_grace {
        let purge_begun: bool = sqlx::query_scalar(concat!(
            "select exists (",
            crate::purge_steps_of_deletion!(),
            ")"
        ))
        .bind(store::account_stream(account_id))
        .fetch_one(&mut *conn)
        .await?;
        if !purge_begun {
            let event = NewEvent::new(
                DomainEvent::AccountRestored(crate::catalog::AccountRestored { account_id }),
                metadata,
            );
            store::append_and_apply(
                conn,
                &store::account_stream(account_id),
                ExpectedVersion::Any,
                &event,
            )
            .await?;
            return Ok(Restore::Restored);
        }
    }
    match row {
        Some(_) => Ok(Restore::NotRestorable),
        None => Ok(Restore::UnknownAccount),
    }
}
