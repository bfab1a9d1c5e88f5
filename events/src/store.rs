//! The event store: append with an expected version, idempotent on
//! `event_id`, several events atomically; read a stream.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Acquire, PgConnection};

use uuid::Uuid;

use crate::Error;
use crate::catalog::{DomainEvent, Metadata};

/// What the writer believes the stream's version is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// Append at whatever the next version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be exactly at this version.
    Exact(i32),
}

impl ExpectedVersion {
    /// As the append functions take it: null for any version, 0 for a
    /// stream that must not exist yet.
    fn as_db(self) -> Option<i32> {
        match self {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(v) => Some(v),
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event: DomainEvent,
    pub metadata: Metadata,
}

impl NewEvent {
    pub fn new(event: DomainEvent, metadata: Metadata) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event,
            metadata,
        }
    }
}

/// The result of an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Global positions of the events, in order.
    pub positions: Vec<i64>,
    /// The stream's version after the append.
    pub version: i32,
    /// Every event was already stored: nothing was written.
    pub duplicate: bool,
}

/// An event as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RecordedEvent {
    pub global_position: i64,
    pub event_id: Uuid,
    pub stream_id: String,
    pub stream_version: i32,
    pub event_type: String,
    pub schema_version: i16,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// The columns of [`RecordedEvent`], for queries that return it.
pub const RECORDED_COLUMNS: &str = "global_position, event_id, stream_id, stream_version, \
     event_type, schema_version, payload, metadata, recorded_at";

impl RecordedEvent {
    /// The typed event, upcast to its current shape.
    pub fn decode(&self) -> Result<DomainEvent, Error> {
        DomainEvent::decode(&self.event_type, self.schema_version, self.payload.clone())
    }
}

/// Append `events` to `stream_id` atomically.
///
/// One round trip (`slate_append_events`) on its own; inside the caller's
/// transaction, a savepoint around it. A version mismatch is
/// [`Error::Conflict`] and writes nothing; appending events whose ids are
/// all stored already is a no-op reported as `duplicate`.
pub async fn append(
    conn: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Appended, Error> {
    Ok(append_at(conn, stream_id, expected, events).await?.0)
}

#[derive(sqlx::FromRow)]
struct AppendRow {
    status: String,
    version: Option<i32>,
    positions: Option<Vec<i64>>,
    recorded_at: DateTime<Utc>,
}

/// [`append`], also returning the events' `recorded_at`.
async fn append_at(
    conn: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<(Appended, DateTime<Utc>), Error> {
    if events.is_empty() {
        return Err(Error::InvalidArgument("nothing to append".into()));
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event.event_type()).collect();
    let schema_versions: Vec<i16> = events.iter().map(|e| e.event.schema_version()).collect();
    let payloads: Vec<Value> = events.iter().map(|e| e.event.payload()).collect();
    let metadata: Vec<Value> = events.iter().map(|e| e.metadata.to_json()).collect();
    let expected_arg = expected.as_db();
    let query = || {
        sqlx::query_as::<_, AppendRow>(
            "select status, version, positions, recorded_at
               from slate_append_events($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(stream_id)
        .bind(expected_arg)
        .bind(&ids)
        .bind(&types)
        .bind(&schema_versions)
        .bind(&payloads)
        .bind(&metadata)
    };
    // A writer raced us to the stream's next version: status `raced` when
    // nothing was written, SL010 when some of several events were (undone
    // with the savepoint). Look again; the caller's transaction survives.
    // One event is never partly written, so it needs no savepoint (two round
    // trips fewer for the common append inside a transaction).
    let raced = |e: &sqlx::Error| {
        e.as_database_error()
            .is_some_and(|d| d.code().as_deref() == Some("SL010"))
    };
    let savepoint = events.len() > 1 && sqlx::Connection::is_in_transaction(&*conn);
    let mut row = None;
    for _ in 0..5 {
        let result = if savepoint {
            let mut savepoint = conn.begin().await?;
            match query().fetch_one(&mut *savepoint).await {
                Ok(r) => {
                    savepoint.commit().await?;
                    Ok(r)
                }
                Err(e) => {
                    savepoint.rollback().await?;
                    Err(e)
                }
            }
        } else {
            query().fetch_one(&mut *conn).await
        };
        match result {
            // Nothing written: a writer took the stream's next version.
            Ok(r) if r.status == "raced" => continue,
            Ok(r) => {
                row = Some(r);
                break;
            }
            Err(e) if raced(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let Some(row) = row else {
        return Err(Error::Conflict {
            stream_id: stream_id.to_owned(),
            expected: expected.to_string(),
            actual: -1,
        });
    };
    let recorded_at = row.recorded_at;
    outcome(&row.status, row.version, row.positions, stream_id, expected).map(|a| (a, recorded_at))
}

/// What an append function's status means for the caller: appended,
/// duplicate (nothing written), a reused event id, or a version conflict.
fn outcome(
    status: &str,
    version: Option<i32>,
    positions: Option<Vec<i64>>,
    stream_id: &str,
    expected: ExpectedVersion,
) -> Result<Appended, Error> {
    match status {
        "appended" | "duplicate" => Ok(Appended {
            positions: positions.unwrap_or_default(),
            version: version.unwrap_or(0),
            duplicate: status == "duplicate",
        }),
        "key_reused" => Err(Error::KeyReused),
        _ => Err(Error::Conflict {
            stream_id: stream_id.to_owned(),
            expected: expected.to_string(),
            actual: version.unwrap_or(0),
        }),
    }
}

/// Every event of one stream, in version order.
pub async fn read_stream(
    conn: &mut PgConnection,
    stream_id: &str,
) -> Result<Vec<RecordedEvent>, Error> {
    let sql = format!(
        "select {RECORDED_COLUMNS} from events where stream_id = $1 order by stream_version"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(stream_id)
        .fetch_all(conn)
        .await?)
}

/// The stream of an account.
pub fn account_stream(account_id: Uuid) -> String {
    format!("account-{account_id}")
}

/// Append one event and apply it to the inline projections that follow it,
/// in one transaction (the caller's, when given one). A duplicate (same
/// `event_id`) is a no-op.
///
/// Inside the caller's transaction no savepoint is taken: an error here
/// leaves that transaction aborted, and every caller gives up on it (two
/// round trips fewer per event in every domain transaction).
pub async fn append_and_apply(
    conn: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    event: &NewEvent,
) -> Result<Appended, Error> {
    if !crate::projections::has_inline(&event.event) {
        return append(conn, stream_id, expected, std::slice::from_ref(event)).await;
    }
    if sqlx::Connection::is_in_transaction(&*conn) {
        return append_applied(conn, stream_id, expected, event).await;
    }
    let mut tx = conn.begin().await?;
    let appended = append_applied(&mut tx, stream_id, expected, event).await?;
    tx.commit().await?;
    Ok(appended)
}

async fn append_applied(
    conn: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    event: &NewEvent,
) -> Result<Appended, Error> {
    let (appended, recorded_at) =
        append_at(conn, stream_id, expected, std::slice::from_ref(event)).await?;
    if !appended.duplicate {
        crate::projections::apply_inline(conn, &event.event, appended.positions[0], recorded_at)
            .await?;
    }
    Ok(appended)
}

/// Append a system event to an account's stream (applying it inline) at
/// most once per `key`, however often this is called.
pub async fn record_once(
    conn: &mut PgConnection,
    account_id: Uuid,
    key: &str,
    event: DomainEvent,
) -> Result<Appended, Error> {
    let event = NewEvent {
        event_id: deterministic_event_id(key),
        event,
        metadata: Metadata::system(),
    };
    append_and_apply(
        conn,
        &account_stream(account_id),
        ExpectedVersion::Any,
        &event,
    )
    .await
}

/// A deterministic event id for an event that must be appended at most once
/// per `key` (for instance per Stripe object), whoever appends it and however
/// often.
pub fn deterministic_event_id(key: &str) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x2b8e_91c4_3d5f_4a60_8e1b_7c9d_0a2f_3e4d);
    Uuid::new_v5(&NAMESPACE, key.as_bytes())
}

impl From<crate::batch::Closed> for Error {
    fn from(_: crate::batch::Closed) -> Self {
        Error::Database(sqlx::Error::PoolClosed)
    }
}

/// One caller's append waiting for a group commit.
#[derive(Debug, Clone)]
pub struct PendingAppend {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// Appends from concurrent callers committed together
/// (`slate_append_batch`): one transaction and one WAL flush carry many
/// callers' events, and each caller is answered only after that commit,
/// with the outcome it would have had alone ([`append`]'s). For appends that
/// are a transaction of their own; an append inside a caller's transaction
/// uses [`append`].
#[derive(Clone)]
pub struct GroupCommit {
    batcher: crate::batch::Batcher<AppendWriter>,
}

impl GroupCommit {
    /// Start the writers on the current tokio runtime.
    pub fn start(pool: sqlx::PgPool, options: crate::batch::BatchOptions) -> Self {
        Self {
            batcher: crate::batch::Batcher::start(AppendWriter { pool }, options),
        }
    }

    pub async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, Error> {
        if events.is_empty() {
            return Err(Error::InvalidArgument("nothing to append".into()));
        }
        self.batcher
            .submit(PendingAppend {
                stream_id: stream_id.to_owned(),
                expected,
                events,
            })
            .await
    }
}

struct AppendWriter {
    pool: sqlx::PgPool,
}

/// One item's row of `slate_append_batch`, in item order.
#[derive(Debug, sqlx::FromRow)]
pub struct BatchRow {
    /// `appended`, `duplicate`, `key_reused`, `conflict` or `raced`.
    pub status: String,
    pub version: Option<i32>,
    pub positions: Option<Vec<i64>>,
}

impl BatchRow {
    /// The item's outcome ("raced" reads as a conflict: callers that can
    /// retry check for it first).
    fn outcome(self, item: &PendingAppend) -> Result<Appended, Error> {
        outcome(
            &self.status,
            self.version,
            self.positions,
            &item.stream_id,
            item.expected,
        )
    }
}

impl crate::batch::BatchWrite for AppendWriter {
    type Item = PendingAppend;
    type Output = Appended;
    type Error = Error;

    async fn write(&self, items: Vec<PendingAppend>) -> Vec<Result<Appended, Error>> {
        let rows = match append_batch(&self.pool, &items).await {
            Ok(rows) if rows.len() == items.len() => rows,
            // No connection within the acquire timeout: alone, each would
            // wait as long again for the same answer.
            Err(e) if crate::db::timed_out_in(&e) => {
                return items.iter().map(|_| Err(timed_out())).collect();
            }
            // The batch as a whole failed (connection lost, commit unknown):
            // each item alone. Appends are idempotent on event ids, so an item
            // that did commit reports `duplicate`.
            Ok(_) | Err(_) => {
                return futures::future::join_all(items.iter().map(|i| self.one(i))).await;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (item, row) in items.iter().zip(rows) {
            out.push(if row.status == "raced" {
                // A writer of the same stream won the version: alone, with
                // append's own retries.
                self.one(item).await
            } else {
                row.outcome(item)
            });
        }
        out
    }

    fn refusal(&self, outcome: &Result<Appended, Error>) -> Option<Error> {
        match outcome {
            Err(e) if crate::db::timed_out_in(e) => Some(timed_out()),
            _ => None,
        }
    }
}

fn timed_out() -> Error {
    Error::Database(sqlx::Error::PoolTimedOut)
}

impl AppendWriter {
    async fn one(&self, item: &PendingAppend) -> Result<Appended, Error> {
        let mut conn = self.pool.acquire().await?;
        append(&mut conn, &item.stream_id, item.expected, &item.events).await
    }
}

/// One statement that is its own transaction: one round trip, and its rows
/// arrive only after the commit (the server answers ReadyForQuery after
/// committing, and the query ends there). [`GroupCommit`]'s writers call it
/// with what is waiting; public so that a test can compose a batch.
pub async fn append_batch(
    pool: &sqlx::PgPool,
    items: &[PendingAppend],
) -> Result<Vec<BatchRow>, Error> {
    let n: usize = items.iter().map(|i| i.events.len()).sum();
    let mut streams = Vec::with_capacity(items.len());
    let mut expected = Vec::with_capacity(items.len());
    let mut counts = Vec::with_capacity(items.len());
    let mut ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut schema_versions = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    for item in items {
        streams.push(item.stream_id.as_str());
        expected.push(item.expected.as_db());
        counts.push(item.events.len() as i32);
        for e in &item.events {
            ids.push(e.event_id);
            types.push(e.event.event_type());
            schema_versions.push(e.event.schema_version());
            payloads.push(e.event.payload());
            metadata.push(e.metadata.to_json());
        }
    }
    Ok(sqlx::query_as(
        "select status, version, positions
           from slate_append_batch($1, $2, $3, $4, $5, $6, $7, $8) order by item",
    )
    .bind(&streams)
    .bind(&expected)
    .bind(&counts)
    .bind(&ids)
    .bind(&types)
    .bind(&schema_versions)
    .bind(&payloads)
    .bind(&metadata)
    .fetch_all(pool)
    .await?)
}
