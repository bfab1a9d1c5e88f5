//! Generations: submission (reserve + `GenerationRequested`, in the
//! caller's transaction), attempts, and exactly one terminal outcome —
//! success with capture, failure or cancellation with release — whatever
//! retries, duplicates or crashes happen: every outcome event has the same
//! deterministic id, so only the first one is ever stored.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Error;
use crate::catalog::{
    DomainEvent, GenerationCancelRequested, GenerationCanceled, GenerationFailed,
    GenerationRequested, GenerationStarted, GenerationSubmitted, GenerationSucceeded, Metadata,
    PromptRejected,
};
use crate::credits;
use crate::store::{self, ExpectedVersion, NewEvent};

pub const KINDS: &[&str] = &["video", "voiceover", "transcription", "script"];

fn stream(id: Uuid) -> String {
    format!("generation-{id}")
}

fn outcome_event_id(id: Uuid) -> Uuid {
    store::deterministic_event_id(&format!("generation-outcome:{id}"))
}

#[derive(Debug, Clone)]
pub struct Submission {
    pub generation_id: Uuid,
    pub account_id: Uuid,
    pub kind: String,
    pub provider: String,
    /// What the provider's price depends on beyond the kind and units
    /// (Seedance's resolution): the operation priced is
    /// `<kind>:<provider>:<tier>`.
    pub tier: Option<String>,
    pub units: i32,
    pub collection_id: String,
    pub prompt: Option<String>,
    pub input_key: Option<String>,
    pub parameters: Value,
    pub deadline: Option<DateTime<Utc>>,
    /// Told the terminal status (Standard Webhooks).
    pub webhook_url: Option<String>,
    /// When an unresolved reservation is released by the sweeper.
    pub hold_until: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Accepted {
        cost: i64,
    },
    Insufficient {
        available: i64,
        shortfall: i64,
    },
    /// The account was deleted after the request was authenticated (the
    /// caller rolls back, as for `Insufficient`).
    AccountDeleted,
}

/// Reserve the approved price and record the request. Runs in the caller's
/// transaction, which must also enqueue the job; on `Insufficient` the
/// caller rolls back (nothing was written).
pub async fn submit(
    conn: &mut PgConnection,
    s: &Submission,
    metadata: &Metadata,
) -> Result<Submitted, Error> {
    // The prompt is sealed first: the reservation below locks the account's
    // credit row until the caller commits, and the worker's capture of this
    // account's previous generation waits for it, so as little as possible
    // comes after it. Prompts are personal: sealed with the account's key
    // (see vault).
    let prompt = match &s.prompt {
        Some(p) => Some(crate::vault::seal(conn, s.account_id, p).await?),
        None => None,
    };
    // The inputs and the reservation in one statement (one round trip). On
    // `Insufficient` the caller rolls back, the inputs with it.
    //
    // The account row is key-share locked until the caller commits, and a
    // deletion locks it for update first (`accounts::request_deletion`): a
    // submission authenticated before a deletion either commits before the
    // deletion looks for open generations (which then cancels this one), or
    // waits for the deletion's commit and is refused here. Without it, a
    // submission committing just after the deletion ran for a deleted
    // account, its credits reserved and its provider paid.
    let operation = match &s.tier {
        Some(tier) => format!("{}:{}:{tier}", s.kind, s.provider),
        None => format!("{}:{}", s.kind, s.provider),
    };
    let v: Value = sqlx::query_scalar(
        "with inputs as (
             insert into generation_inputs (generation_id, prompt, input_key, parameters, webhook_url)
             values ($2, $7, $8, $9, $10)
             on conflict (generation_id) do nothing),
         live as (select deleted_at is null as live from accounts where account_id = $1 for key share)
         select case when coalesce((select live from live), false)
                     then credit_reserve_operation($1, $2, $3, $4, $5, now(), $6)
                     else jsonb_build_object('outcome', 'account_deleted') end",
    )
    .bind(s.account_id)
    .bind(s.generation_id)
    .bind(&operation)
    .bind(s.units)
    .bind(s.hold_until)
    .bind(metadata.to_json())
    .bind(prompt)
    .bind(&s.input_key)
    .bind(&s.parameters)
    .bind(&s.webhook_url)
    .fetch_one(&mut *conn)
    .await?;
    let int = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or_default();
    match v.get("outcome").and_then(Value::as_str) {
        Some("reserved") | Some("duplicate") => {}
        Some("account_deleted") => return Ok(Submitted::AccountDeleted),
        _ => {
            return Ok(Submitted::Insufficient {
                available: int("available"),
                shortfall: int("shortfall"),
            });
        }
    }
    let cost = int("cost");
    let event = NewEvent {
        event_id: store::deterministic_event_id(&format!(
            "generation-requested:{}",
            s.generation_id
        )),
        event: DomainEvent::GenerationRequested(GenerationRequested {
            generation_id: s.generation_id,
            account_id: s.account_id,
            kind: s.kind.clone(),
            provider: s.provider.clone(),
            operation,
            units: s.units,
            cost,
            collection_id: s.collection_id.clone(),
            deadline: s.deadline,
        }),
        metadata: metadata.clone(),
    };
    store::append_and_apply(conn, &stream(s.generation_id), ExpectedVersion::Any, &event).await?;
    Ok(Submitted::Accepted { cost })
}

/// How long an `Idempotency-Key` answers with its first response (as
/// Stripe's do): afterwards the key is free, and a request under it is a
/// new one.
pub const IDEMPOTENCY_KEY_TTL: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// Delete the idempotency keys expired at `now`, up to `limit` (the sweep;
/// the oldest first). The number deleted.
pub async fn expire_idempotency_keys(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<u64, Error> {
    Ok(sqlx::query(
        // `created_at` again outside: a key taken over meanwhile (its row
        // replaced by a new request's) is checked again and kept.
        "delete from idempotency_keys
          where ctid = any(array(
                    select ctid from idempotency_keys where created_at <= $1
                     order by created_at limit $2))
            and created_at <= $1",
    )
    .bind(now - IDEMPOTENCY_KEY_TTL)
    .bind(limit)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// A deny-listed prompt: recorded with its category and hash only, the
/// hash sealed with the account's data key (a short prompt could be found
/// again from its plain hash by guessing, after a purge too).
pub async fn record_prompt_rejection(
    conn: &mut PgConnection,
    account_id: Uuid,
    category: &str,
    prompt_sha256: &str,
    metadata: Metadata,
) -> Result<(), Error> {
    let prompt_sha256 = crate::vault::seal(conn, account_id, prompt_sha256).await?;
    let event = NewEvent::new(
        DomainEvent::PromptRejected(PromptRejected {
            account_id,
            category: category.to_owned(),
            prompt_sha256,
        }),
        metadata,
    );
    store::append(
        conn,
        &format!("moderation-{account_id}"),
        ExpectedVersion::Any,
        &[event],
    )
    .await?;
    Ok(())
}

/// A generation as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Generation {
    pub generation_id: Uuid,
    pub account_id: Uuid,
    pub kind: String,
    pub provider: String,
    pub units: i32,
    pub cost: i64,
    pub collection_id: String,
    pub status: String,
    pub attempts: i32,
    pub provider_handle: Option<String>,
    pub cancel_requested: bool,
    pub deadline: Option<DateTime<Utc>>,
    pub output_key: Option<String>,
    pub output_content_type: Option<String>,
    pub output_bytes: Option<i64>,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub duration_ms: Option<i64>,
    pub failure_code: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The statuses the `generations` table allows (its check).
pub const STATUSES: &[&str] = &["queued", "running", "succeeded", "failed", "canceled"];

impl Generation {
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "canceled")
    }
}

const COLUMNS: &str = "generation_id, account_id, kind, provider, units, cost, collection_id, status, \
    attempts, provider_handle, cancel_requested, deadline, output_key, output_content_type, output_bytes, \
    width, height, duration_ms, failure_code, created_at, updated_at";

/// One generation of one account (`None` for another account's).
pub async fn get(
    conn: &mut PgConnection,
    account_id: Uuid,
    id: Uuid,
) -> Result<Option<Generation>, Error> {
    Ok(sqlx::query_as(trusted_sql!(
        "select {COLUMNS} from generations where generation_id = $1 and account_id = $2"
    ))
    .bind(id)
    .bind(account_id)
    .fetch_optional(conn)
    .await?)
}

pub async fn get_any(conn: &mut PgConnection, id: Uuid) -> Result<Option<Generation>, Error> {
    Ok(sqlx::query_as(trusted_sql!(
        "select {COLUMNS} from generations where generation_id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// The account's generations still queued or running, whole (through
/// `generations_account_unfinished_idx`).
pub(crate) async fn unfinished_of(
    conn: &mut PgConnection,
    account_id: Uuid,
) -> Result<Vec<Generation>, Error> {
    Ok(sqlx::query_as(trusted_sql!(
        "select {COLUMNS} from generations
          where account_id = $1 and status in ('queued', 'running')"
    ))
    .bind(account_id)
    .fetch_all(conn)
    .await?)
}

/// Which of an account's generations [`list`] gives (each `None`: any).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub collection_id: Option<String>,
}

/// Newest first; `after` is the last item of the previous page.
pub async fn list(
    conn: &mut PgConnection,
    account_id: Uuid,
    filter: &ListFilter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<Generation>, Error> {
    let (at, id) = after.map_or((None, None), |(a, i)| (Some(a), Some(i)));
    Ok(sqlx::query_as(trusted_sql!(
        "select {COLUMNS} from generations
          where account_id = $1 and ($2::timestamptz is null or (created_at, generation_id) < ($2, $3))
            and ($5::text is null or status = $5)
            and ($6::text is null or kind = $6)
            and ($7::text is null or collection_id = $7)
          order by created_at desc, generation_id desc limit $4"
    ))
    .bind(account_id)
    .bind(at)
    .bind(id)
    .bind(limit)
    .bind(&filter.status)
    .bind(&filter.kind)
    .bind(&filter.collection_id)
    .fetch_all(conn)
    .await?)
}

/// What a worker needs for an attempt: the generation, its private inputs
/// (the prompt opened) and the completion webhook's address, if any.
#[derive(Debug, Clone)]
pub struct Work {
    pub generation: Generation,
    pub prompt: Option<String>,
    pub input_key: Option<String>,
    /// The provider options as submitted (`{}` when there are none).
    pub parameters: Value,
    pub webhook_url: Option<String>,
}

#[derive(sqlx::FromRow)]
struct WorkRow {
    #[sqlx(flatten)]
    generation: Generation,
    prompt: Option<String>,
    input_key: Option<String>,
    parameters: Option<Value>,
    webhook_url: Option<String>,
    wrapped_key: Option<String>,
}

/// [`Work`] for one generation, in one round trip (the generation, its
/// inputs and its account's data key together).
pub async fn work(conn: &mut PgConnection, id: Uuid) -> Result<Option<Work>, Error> {
    let row: Option<WorkRow> = sqlx::query_as(trusted_sql!(
        "select {COLUMNS}, i.prompt, i.input_key, i.parameters, i.webhook_url,
                (select k.wrapped from account_keys k where k.account_id = g.account_id) as wrapped_key
           from generations g left join generation_inputs i using (generation_id)
          where generation_id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let prompt = match row.prompt {
        Some(p) => {
            let account = row.generation.account_id;
            crate::vault::Keyring::with_wrapped(account, row.wrapped_key.as_deref())
                .open(conn, &p)
                .await?
                .into_option()
        }
        None => None,
    };
    Ok(Some(Work {
        generation: row.generation,
        prompt,
        input_key: row.input_key,
        parameters: row
            .parameters
            .filter(|p| !p.is_null())
            .unwrap_or_else(|| Value::Object(Default::default())),
        webhook_url: row.webhook_url,
    }))
}

async fn append(
    conn: &mut PgConnection,
    id: Uuid,
    event_id: Uuid,
    event: DomainEvent,
    metadata: &Metadata,
) -> Result<bool, Error> {
    let event = NewEvent {
        event_id,
        event,
        metadata: metadata.clone(),
    };
    let appended = store::append_and_apply(conn, &stream(id), ExpectedVersion::Any, &event).await?;
    Ok(!appended.duplicate)
}

/// Take the generation's lock for the rest of the caller's transaction:
/// a cancellation (a user's, or its deadline's) and an attempt's start
/// ([`record_started`]) take turns, so the start sees a cancellation that
/// came first, and a cancellation sees the generation running.
pub async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<(), Error> {
    sqlx::query("select pg_advisory_xact_lock(hashtext($1))")
        .bind(lock_key(id))
        .execute(conn)
        .await?;
    Ok(())
}

/// Wait for the attempts of `account_id`'s generations that are recording
/// their start, and keep new ones from recording theirs, for the rest of
/// the caller's transaction: an account's deletion, which cancels every
/// generation of the account. Each start holds this lock shared
/// ([`record_started`]) and then reads its generation's status, so one that
/// waited finds it canceled. One lock for the account, not one per
/// generation: the server's lock table holds a few thousand, and an account
/// can have more generations queued.
pub async fn hold_starts(conn: &mut PgConnection, account_id: Uuid) -> Result<(), Error> {
    sqlx::query("select pg_advisory_xact_lock(hashtext($1))")
        .bind(starts_lock_key(account_id))
        .execute(conn)
        .await?;
    Ok(())
}

/// The advisory lock's key of the starts of `account_id`'s generations
/// ([`hold_starts`]).
fn starts_lock_key(account_id: Uuid) -> String {
    format!("generation-starts:{account_id}")
}

/// The advisory lock's key of generation `id` ([`lock`]).
fn lock_key(id: Uuid) -> String {
    format!("generation:{id}")
}

/// `GenerationStarted` for this attempt, in a transaction of its own that
/// commits without waiting for its WAL flush (`synchronous_commit = off`).
///
/// The event only marks progress. A server crash can lose it (the last
/// moments of asynchronous commits), and then nothing that depends on it
/// survives either: the attempt's next durable write (the provider's handle,
/// the outcome, a refund) flushes every WAL record before its own, and a
/// projector's durable checkpoint past it flushes it too. What a crash can
/// do is show a generation as running and then as queued again, which it is
/// (the queue runs the attempt again, and appending its start again is a
/// no-op: the event id is derived from the attempt).
///
/// Returns whether the generation is running now ([`Start`]). It is not
/// when it was finished meanwhile (a cancellation of the queued generation
/// that committed after the worker read it), or when its cancellation was
/// asked for meanwhile and no provider job was submitted for it (an earlier
/// attempt's retry, canceled while it waited): the attempt must not go to
/// the provider. Its transaction holds the generation's lock, which a
/// cancellation takes too: one that comes later finds it running and asks
/// the attempt to stop instead.
pub async fn record_started(
    conn: &mut PgConnection,
    g: &Generation,
    attempt: i32,
    metadata: &Metadata,
) -> Result<Start, Error> {
    debug_assert!(
        !sqlx::Connection::is_in_transaction(&*conn),
        "record_started commits on its own"
    );
    // One round trip: the setting and the locks (the account's starts,
    // shared, as [`hold_starts`] takes it exclusively; then [`lock`]'s) are
    // sent with the `begin` (a uuid's text needs no quoting).
    let begin = format!(
        "begin; set local synchronous_commit = off;
         select pg_advisory_xact_lock_shared(hashtext('{}'));
         select pg_advisory_xact_lock(hashtext('{}'))",
        starts_lock_key(g.account_id),
        lock_key(g.generation_id)
    );
    let mut tx = sqlx::Connection::begin_with(&mut *conn, sqlx::AssertSqlSafe(begin)).await?;
    // Read under the lock (a statement of its own: one that took the lock
    // itself would read from before its wait). A finished generation gets
    // no start after its end in its log.
    let now: Option<(String, bool)> = sqlx::query_as(
        "select status, cancel_requested and provider_handle is null
           from generations where generation_id = $1",
    )
    .bind(g.generation_id)
    .fetch_optional(&mut *tx)
    .await?;
    let start = match now {
        Some((status, cancel)) if matches!(status.as_str(), "queued" | "running") => {
            if cancel {
                Start::CancelRequested
            } else {
                Start::Running
            }
        }
        _ => Start::Finished,
    };
    if start == Start::Running {
        append(
            &mut tx,
            g.generation_id,
            store::deterministic_event_id(&format!(
                "generation-started:{}:{attempt}",
                g.generation_id
            )),
            DomainEvent::GenerationStarted(GenerationStarted {
                generation_id: g.generation_id,
                account_id: g.account_id,
                attempt,
            }),
            metadata,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(start)
}

/// What [`record_started`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Running: the attempt goes on.
    Running,
    /// Finished meanwhile (canceled while queued, or past its deadline).
    Finished,
    /// Its cancellation was asked for, and no provider job was submitted
    /// for it: the attempt ends it canceled instead.
    CancelRequested,
}

pub async fn record_submitted(
    conn: &mut PgConnection,
    g: &Generation,
    handle: &str,
    metadata: &Metadata,
) -> Result<(), Error> {
    append(
        conn,
        g.generation_id,
        store::deterministic_event_id(&format!("generation-submitted:{}", g.generation_id)),
        DomainEvent::GenerationSubmitted(GenerationSubmitted {
            generation_id: g.generation_id,
            account_id: g.account_id,
            provider_handle: handle.to_owned(),
        }),
        metadata,
    )
    .await?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Output {
    pub key: String,
    pub content_type: String,
    pub bytes: i64,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub duration_ms: Option<i64>,
}

/// Success and capture, in the caller's transaction. False when another
/// outcome was recorded first (nothing changed).
pub async fn succeed(
    conn: &mut PgConnection,
    g: &Generation,
    out: &Output,
    metadata: &Metadata,
) -> Result<bool, Error> {
    let first = append(
        conn,
        g.generation_id,
        outcome_event_id(g.generation_id),
        DomainEvent::GenerationSucceeded(GenerationSucceeded {
            generation_id: g.generation_id,
            account_id: g.account_id,
            output_key: out.key.clone(),
            content_type: out.content_type.clone(),
            bytes: out.bytes,
            width: out.width,
            height: out.height,
            duration_ms: out.duration_ms,
        }),
        metadata,
    )
    .await?;
    if first {
        credits::capture(conn, g.generation_id, metadata).await?;
    }
    Ok(first)
}

/// Terminal failure and release (the compensating refund), in the caller's
/// transaction. False when another outcome was recorded first.
pub async fn fail(
    conn: &mut PgConnection,
    g: &Generation,
    reason_code: &str,
    attempts: i32,
    metadata: &Metadata,
) -> Result<bool, Error> {
    let first = append(
        conn,
        g.generation_id,
        outcome_event_id(g.generation_id),
        DomainEvent::GenerationFailed(GenerationFailed {
            generation_id: g.generation_id,
            account_id: g.account_id,
            reason_code: reason_code.to_owned(),
            attempts,
        }),
        metadata,
    )
    .await?;
    if first {
        credits::release(
            conn,
            g.generation_id,
            &format!("generation_failed:{reason_code}"),
            metadata,
        )
        .await?;
    }
    Ok(first)
}

/// Canceled unbilled and released, in the caller's transaction. False when
/// another outcome was recorded first.
pub async fn cancel_now(
    conn: &mut PgConnection,
    g: &Generation,
    reason: &str,
    metadata: &Metadata,
) -> Result<bool, Error> {
    let first = record_canceled(conn, g, reason, metadata).await?;
    if first {
        credits::release(conn, g.generation_id, reason, metadata).await?;
    }
    Ok(first)
}

/// [`cancel_now`]'s outcome without its release, which the caller owes
/// when this returns true (the outcome was recorded first).
pub(crate) async fn record_canceled(
    conn: &mut PgConnection,
    g: &Generation,
    reason: &str,
    metadata: &Metadata,
) -> Result<bool, Error> {
    append(
        conn,
        g.generation_id,
        outcome_event_id(g.generation_id),
        DomainEvent::GenerationCanceled(GenerationCanceled {
            generation_id: g.generation_id,
            account_id: g.account_id,
            reason: reason.to_owned(),
        }),
        metadata,
    )
    .await
}

pub async fn request_cancel(
    conn: &mut PgConnection,
    g: &Generation,
    metadata: &Metadata,
) -> Result<(), Error> {
    append(
        conn,
        g.generation_id,
        store::deterministic_event_id(&format!("generation-cancel-requested:{}", g.generation_id)),
        DomainEvent::GenerationCancelRequested(GenerationCancelRequested {
            generation_id: g.generation_id,
            account_id: g.account_id,
        }),
        metadata,
    )
    .await?;
    Ok(())
}

/// Generations past their deadline and not finished.
pub async fn overdue(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Uuid>, Error> {
    Ok(sqlx::query_scalar(
        "select generation_id from generations
          where status in ('queued', 'running') and deadline is not null and deadline <= $1
          order by deadline limit $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}
