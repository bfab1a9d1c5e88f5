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
/// Runs inside the caller's transaction when given one (as a savepoint), or
/// in its own. A version mismatch is [`Error::Conflict`] and writes nothing;
/// appending events whose ids are all stored already is a no-op reported as
/// `duplicate`.
pub async fn append(
    conn: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
) -> Result<Appended, Error> {
    if events.is_empty() {
        return Err(Error::InvalidArgument("nothing to append".into()));
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();

    // Up to a few attempts for `Any`: another writer may take the next version.
    for _ in 0..5 {
        let mut tx = conn.begin().await?;

        let stored: Vec<(Uuid, String, i32, i64)> = sqlx::query_as(
            "select event_id, stream_id, stream_version, global_position
               from events where event_id = any($1) order by global_position",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        if !stored.is_empty() {
            let same_stream = stored.iter().all(|(_, s, _, _)| s == stream_id);
            if stored.len() == events.len() && same_stream {
                return Ok(Appended {
                    positions: stored.iter().map(|r| r.3).collect(),
                    version: stored.iter().map(|r| r.2).max().unwrap_or(0),
                    duplicate: true,
                });
            }
            return Err(Error::KeyReused);
        }

        let current: i32 = sqlx::query_scalar(
            "select coalesce(max(stream_version), 0) from events where stream_id = $1",
        )
        .bind(stream_id)
        .fetch_one(&mut *tx)
        .await?;
        let ok = match expected {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exact(v) => current == v,
        };
        if !ok {
            return Err(Error::Conflict {
                stream_id: stream_id.to_owned(),
                expected: expected.to_string(),
                actual: current,
            });
        }

        let n = events.len();
        let versions: Vec<i32> = (1..=n as i32).map(|i| current + i).collect();
        let types: Vec<&str> = events.iter().map(|e| e.event.event_type()).collect();
        let schema_versions: Vec<i16> = events.iter().map(|e| e.event.schema_version()).collect();
        let payloads: Vec<Value> = events.iter().map(|e| e.event.payload()).collect();
        let metadata: Vec<Value> = events.iter().map(|e| e.metadata.to_json()).collect();

        // ON CONFLICT DO NOTHING: a concurrent writer that took one of our
        // versions (or ids) makes us write fewer rows instead of aborting the
        // caller's transaction.
        let positions: Vec<i64> = sqlx::query_scalar(
            "insert into events (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata)
             select id, $2, v, t, sv, p, m
               from unnest($1::uuid[], $3::int[], $4::text[], $5::smallint[], $6::jsonb[], $7::jsonb[])
                    as x(id, v, t, sv, p, m)
             order by v
             on conflict do nothing
             returning global_position",
        )
        .bind(&ids)
        .bind(stream_id)
        .bind(&versions)
        .bind(&types)
        .bind(&schema_versions)
        .bind(&payloads)
        .bind(&metadata)
        .fetch_all(&mut *tx)
        .await?;

        if positions.len() == n {
            tx.commit().await?;
            let mut positions = positions;
            positions.sort_unstable();
            return Ok(Appended {
                positions,
                version: current + n as i32,
                duplicate: false,
            });
        }
        // Someone else wrote first. Look again: either our events are there
        // now (a concurrent retry of the same append: duplicate), or the
        // version moved (conflict, unless `Any`).
        tx.rollback().await?;
    }
    Err(Error::Conflict {
        stream_id: stream_id.to_owned(),
        expected: expected.to_string(),
        actual: -1,
    })
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
pub async fn append_and_apply(
    conn: &mut PgConnection,
    stream_id: &str,
    expected: ExpectedVersion,
    event: &NewEvent,
) -> Result<Appended, Error> {
    let mut tx = conn.begin().await?;
    let appended = append(&mut tx, stream_id, expected, std::slice::from_ref(event)).await?;
    if !appended.duplicate {
        let recorded_at: DateTime<Utc> =
            sqlx::query_scalar("select recorded_at from events where global_position = $1")
                .bind(appended.positions[0])
                .fetch_one(&mut *tx)
                .await?;
        crate::projections::apply_inline(&mut tx, &event.event, appended.positions[0], recorded_at)
            .await?;
    }
    tx.commit().await?;
    Ok(appended)
}

/// A deterministic event id for an event that must be appended at most once
/// per `key` (for instance per Stripe object), whoever appends it and however
/// often.
pub fn deterministic_event_id(key: &str) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x2b8e_91c4_3d5f_4a60_8e1b_7c9d_0a2f_3e4d);
    Uuid::new_v5(&NAMESPACE, key.as_bytes())
}
