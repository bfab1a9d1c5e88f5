//! Projections: read models built from the log.
//!
//! * Inline (`credits`): accounts, balances, buckets, reservations. Written in
//!   the same transaction as the append; they back exact decisions.
//! * Asynchronous (`credit_ledger`, more to come): a projector per projection
//!   follows the log gap-safely and keeps a checkpoint. One active instance
//!   per projection across all processes (advisory lock).
//!
//! Every projection can be rebuilt from the log alone, and `verify` rebuilds
//! into scratch tables and compares them with the live ones.

pub mod access;
pub mod affiliates;
pub mod audit;
pub mod billing;
pub mod generations;
pub mod inline;
pub mod ledger;
mod projector;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::Error;
use crate::catalog::DomainEvent;
use crate::store::{RECORDED_COLUMNS, RecordedEvent};

pub use projector::{
    SKIP_MIN, SKIP_WALK, batch_statement, catch_up, has_batch, poll, run_batch, run_projector,
    skip_ahead,
};

/// A table of a projection and the columns that must match on verify.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    pub columns: &'static str,
}

/// Every projection, by the name the CLI uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    /// Inline: accounts and the credit ledger's balances.
    Credits,
    /// Inline: Stripe customers, subscriptions, past-due status.
    Billing,
    /// Inline: API keys.
    Access,
    /// Inline: affiliates and referrals.
    Affiliates,
    /// Inline: generations.
    Generations,
    /// Asynchronous: one row per credit movement.
    CreditLedger,
    /// Asynchronous: one row per affiliate commission movement.
    AffiliateCommissions,
    /// Asynchronous: the audit log, one entry per event.
    AuditLog,
}

impl Projection {
    pub const ALL: &'static [Projection] = &[
        Projection::Credits,
        Projection::Billing,
        Projection::Access,
        Projection::Affiliates,
        Projection::Generations,
        Projection::CreditLedger,
        Projection::AffiliateCommissions,
        Projection::AuditLog,
    ];
    pub const ASYNC: &'static [Projection] = &[
        Projection::CreditLedger,
        Projection::AffiliateCommissions,
        Projection::AuditLog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Projection::Credits => "credits",
            Projection::Billing => "billing",
            Projection::Access => "access",
            Projection::Affiliates => "affiliates",
            Projection::Generations => "generations",
            Projection::AffiliateCommissions => affiliates::NAME,
            Projection::AuditLog => audit::NAME,
            Projection::CreditLedger => ledger::NAME,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.name() == name)
    }

    pub fn is_inline(self) -> bool {
        !Self::ASYNC.contains(&self)
    }

    pub fn tables(self) -> &'static [Table] {
        match self {
            Projection::Credits => inline::TABLES,
            Projection::Billing => billing::TABLES,
            Projection::Access => access::TABLES,
            Projection::Affiliates => affiliates::INLINE_TABLES,
            Projection::Generations => generations::TABLES,
            Projection::AffiliateCommissions => affiliates::ASYNC_TABLES,
            Projection::AuditLog => audit::TABLES,
            Projection::CreditLedger => ledger::TABLES,
        }
    }

    pub fn event_types(self) -> &'static [&'static str] {
        match self {
            Projection::Credits => inline::EVENT_TYPES,
            Projection::Billing => billing::EVENT_TYPES,
            Projection::Access => access::EVENT_TYPES,
            Projection::Affiliates => affiliates::INLINE_EVENT_TYPES,
            Projection::Generations => generations::EVENT_TYPES,
            Projection::AffiliateCommissions => affiliates::ASYNC_EVENT_TYPES,
            Projection::AuditLog => audit::EVENT_TYPES,
            Projection::CreditLedger => ledger::EVENT_TYPES,
        }
    }

    async fn apply(
        self,
        conn: &mut PgConnection,
        prefix: &str,
        event: &DomainEvent,
        position: i64,
        recorded_at: DateTime<Utc>,
    ) -> Result<(), Error> {
        match self {
            Projection::Credits => inline::apply(conn, prefix, event, position, recorded_at).await,
            Projection::Billing => billing::apply(conn, prefix, event, recorded_at).await,
            Projection::Access => access::apply(conn, prefix, event, recorded_at).await,
            Projection::Affiliates => {
                affiliates::apply_inline(conn, prefix, event, recorded_at).await
            }
            Projection::Generations => generations::apply(conn, prefix, event, recorded_at).await,
            Projection::AffiliateCommissions => {
                affiliates::apply_async(conn, prefix, event, position, recorded_at).await
            }
            // Needs the metadata: applied through apply_recorded.
            Projection::AuditLog => Ok(()),
            Projection::CreditLedger => {
                ledger::apply(conn, prefix, event, position, recorded_at).await
            }
        }
    }

    /// Apply a page of recorded events in order: the audit projection in
    /// one INSERT, the others event by event.
    pub(crate) async fn apply_page(
        self,
        conn: &mut PgConnection,
        prefix: &str,
        events: &[&RecordedEvent],
    ) -> Result<(), Error> {
        if self == Projection::AuditLog {
            let decoded = events
                .iter()
                .map(|e| Ok((*e, e.decode()?)))
                .collect::<Result<Vec<_>, Error>>()?;
            return audit::apply_many(conn, prefix, &decoded).await;
        }
        for e in events {
            self.apply_recorded(conn, prefix, e).await?;
        }
        Ok(())
    }

    async fn apply_recorded(
        self,
        conn: &mut PgConnection,
        prefix: &str,
        e: &RecordedEvent,
    ) -> Result<(), Error> {
        let event = e.decode()?;
        if self == Projection::AuditLog {
            return audit::apply(conn, prefix, e, &event).await;
        }
        self.apply(conn, prefix, &event, e.global_position, e.recorded_at)
            .await
    }
}

/// Whether any inline projection follows this event's type.
pub fn has_inline(event: &DomainEvent) -> bool {
    Projection::ALL
        .iter()
        .any(|p| p.is_inline() && p.event_types().contains(&event.event_type()))
}

/// Apply a just-appended event to the inline projections that follow it, in
/// the appending transaction. (The ledger's stored functions update their own
/// tables; this is for events appended from Rust.)
pub async fn apply_inline(
    conn: &mut PgConnection,
    event: &DomainEvent,
    position: i64,
    recorded_at: DateTime<Utc>,
) -> Result<(), Error> {
    for &p in Projection::ALL {
        if p.is_inline() && p.event_types().contains(&event.event_type()) {
            p.apply(conn, "", event, position, recorded_at).await?;
        }
    }
    Ok(())
}

const PAGE: i64 = 1000;

/// Replay the log into tables named with `prefix`. Inline projections replay
/// everything visible in global order (their writers serialize per account);
/// asynchronous ones replay in (transaction, position) order up to their
/// checkpoint, so the result is comparable with the live tables.
async fn replay(conn: &mut PgConnection, p: Projection, prefix: &str) -> Result<u64, Error> {
    let mut n = 0u64;
    if p.is_inline() {
        let mut last = 0i64;
        loop {
            let sql = format!(
                "select {RECORDED_COLUMNS} from events
                  where global_position > $1 and event_type = any($2)
                  order by global_position limit $3"
            );
            let page: Vec<RecordedEvent> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(last)
                .bind(p.event_types())
                .bind(PAGE)
                .fetch_all(&mut *conn)
                .await?;
            let Some(tail) = page.last() else { break };
            last = tail.global_position;
            for e in &page {
                p.apply_recorded(conn, prefix, e).await?;
                n += 1;
            }
        }
    } else {
        // Walk (transaction_id, position) pages up to the checkpoint.
        let mut after: (String, i64) = ("0".into(), 0);
        loop {
            let sql = format!(
                "select e.transaction_id::text as txid, {cols}
                   from events e
                  where (e.transaction_id, e.global_position) > ($2::xid8, $3)
                    and (e.transaction_id, e.global_position) <=
                        ((select last_transaction_id from projection_checkpoints where projection = $1),
                         (select last_position from projection_checkpoints where projection = $1))
                    and e.event_type = any($4)
                  order by e.transaction_id, e.global_position limit $5",
                cols = prefixed_columns("e")
            );
            let page: Vec<TxEvent> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(p.name())
                .bind(&after.0)
                .bind(after.1)
                .bind(p.event_types())
                .bind(PAGE)
                .fetch_all(&mut *conn)
                .await?;
            let Some(tail) = page.last() else { break };
            after = (tail.txid.clone(), tail.event.global_position);
            let events: Vec<&RecordedEvent> = page.iter().map(|e| &e.event).collect();
            p.apply_page(conn, prefix, &events).await?;
            n += page.len() as u64;
        }
    }
    Ok(n)
}

#[derive(sqlx::FromRow)]
pub(crate) struct TxEvent {
    pub txid: String,
    #[sqlx(flatten)]
    pub event: RecordedEvent,
}

pub(crate) fn prefixed_columns(alias: &str) -> String {
    RECORDED_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rebuild a projection's live tables from the log alone.
///
/// Inline projections are rebuilt under an exclusive lock on their tables
/// (writers wait); asynchronous ones reset their checkpoint and replay while
/// holding it (their projector waits).
pub async fn rebuild(pool: &PgPool, p: Projection) -> Result<u64, Error> {
    let mut tx = pool.begin().await?;
    let tables: Vec<&str> = p.tables().iter().map(|t| t.name).collect();
    if p.is_inline() {
        sqlx::query(trusted_sql!("truncate {}", tables.join(", ")))
            .execute(&mut *tx)
            .await?;
        if p == Projection::Generations {
            generations::reset_finished_fold(&mut tx).await?;
        }
        let n = replay(&mut tx, p, "").await?;
        tx.commit().await?;
        return Ok(n);
    }
    projector::lock_checkpoint(&mut tx, p).await?;
    sqlx::query(trusted_sql!("truncate {}", tables.join(", ")))
        .execute(&mut *tx)
        .await?;
    // Secondary indexes are built once at the end instead of maintained row
    // by row (the tables are locked by the truncate until the commit).
    let secondary: Vec<(String, String)> = sqlx::query_as(
        "select i.indexname, i.indexdef from pg_indexes i
          where i.schemaname = current_schema() and i.tablename = any($1)
            and not exists (select 1 from pg_constraint c where c.conname = i.indexname)",
    )
    .bind(&tables)
    .fetch_all(&mut *tx)
    .await?;
    for (name, _) in &secondary {
        sqlx::query(trusted_sql!("drop index \"{name}\""))
            .execute(&mut *tx)
            .await?;
    }
    // The audit projection's rebuild writes without ON CONFLICT: its
    // primary key and unique constraints are built at the end too (and
    // checked then: a violation fails the rebuild, which changes nothing).
    let constraints: Vec<(String, String, String)> = if p == Projection::AuditLog {
        sqlx::query_as(
            "select t.relname::text, c.conname::text, pg_get_constraintdef(c.oid)
               from pg_constraint c join pg_class t on t.oid = c.conrelid
              where t.relnamespace = current_schema()::regnamespace and t.relname = any($1)
                and c.contype in ('p', 'u')
                and not exists (select 1 from pg_constraint f
                                 where f.contype = 'f' and f.confrelid = c.conrelid)",
        )
        .bind(&tables)
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };
    for (table, name, _) in &constraints {
        sqlx::query(trusted_sql!(
            "alter table \"{table}\" drop constraint \"{name}\""
        ))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "update projection_checkpoints
            set last_transaction_id = '0', last_position = 0, events_applied = 0, updated_at = now()
          where projection = $1",
    )
    .bind(p.name())
    .execute(&mut *tx)
    .await?;
    let mut n = 0u64;
    if p == Projection::AuditLog {
        // In bulk up to the gap-safe horizon; the batches below take what
        // became safe to read since.
        if let Some((txid, position, count)) = audit::copy_from_log(pool, &mut tx).await? {
            sqlx::query(
                "update projection_checkpoints
                    set last_transaction_id = $2::xid8, last_position = $3,
                        events_applied = $4, updated_at = now()
                  where projection = $1",
            )
            .bind(p.name())
            .bind(txid)
            .bind(position)
            .bind(count as i64)
            .execute(&mut *tx)
            .await?;
            n = count;
        }
    }
    loop {
        let applied = projector::apply_batch(&mut tx, p, 5 * PAGE).await?;
        if applied == 0 {
            break;
        }
        n += applied as u64;
    }
    // The index builds sort the whole table: give them room (never less
    // than the server's setting; for this transaction only).
    sqlx::query(
        "select set_config('maintenance_work_mem',
                greatest(pg_size_bytes(current_setting('maintenance_work_mem')) / 1024,
                         256 * 1024)::text || 'kB', true)",
    )
    .execute(&mut *tx)
    .await?;
    for (table, name, definition) in &constraints {
        sqlx::query(trusted_sql!(
            "alter table \"{table}\" add constraint \"{name}\" {definition}"
        ))
        .execute(&mut *tx)
        .await?;
    }
    for (_, definition) in &secondary {
        sqlx::query(sqlx::AssertSqlSafe(definition.clone()))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(n)
}

/// Differences between a live table and its rebuilt copy.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TableReport {
    pub projection: &'static str,
    pub table: &'static str,
    pub live_rows: i64,
    pub rebuilt_rows: i64,
    /// Rows only in the live table (a sample of up to 5 in `samples`).
    pub only_live: i64,
    /// Rows only in the rebuilt table.
    pub only_rebuilt: i64,
    pub samples: Vec<String>,
}

impl TableReport {
    pub fn is_clean(&self) -> bool {
        self.only_live == 0 && self.only_rebuilt == 0
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub events_replayed: u64,
    pub tables: Vec<TableReport>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.tables.iter().all(TableReport::is_clean)
    }
}

/// Rebuild the given projections into scratch tables inside one
/// repeatable-read snapshot and compare them with the live tables.
pub async fn verify(pool: &PgPool, projections: &[Projection]) -> Result<VerifyReport, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("set transaction isolation level repeatable read")
        .execute(&mut *tx)
        .await?;
    let mut report = VerifyReport {
        events_replayed: 0,
        tables: Vec::new(),
    };
    for &p in projections {
        for t in p.tables() {
            sqlx::query(trusted_sql!(
                "create temp table scratch_{0} (like {0} including all) on commit drop",
                t.name
            ))
            .execute(&mut *tx)
            .await?;
        }
        report.events_replayed += replay(&mut tx, p, "scratch_").await?;
        for t in p.tables() {
            report.tables.push(compare(&mut tx, p, t).await?);
        }
    }
    tx.rollback().await?;
    Ok(report)
}

async fn compare(conn: &mut PgConnection, p: Projection, t: &Table) -> Result<TableReport, Error> {
    let (live, scratch, cols) = (t.name, format!("scratch_{}", t.name), t.columns);
    let live_rows = count(conn, format!("select count(*) from {live}")).await?;
    let rebuilt_rows = count(conn, format!("select count(*) from {scratch}")).await?;
    let only_live = count(
        conn,
        format!("select count(*) from (select {cols} from {live} except all select {cols} from {scratch}) d"),
    )
    .await?;
    let only_rebuilt = count(
        conn,
        format!("select count(*) from (select {cols} from {scratch} except all select {cols} from {live}) d"),
    )
    .await?;
    let mut samples = Vec::new();
    if only_live + only_rebuilt > 0 {
        for (side, a, b) in [
            ("live", live, scratch.as_str()),
            ("rebuilt", scratch.as_str(), live),
        ] {
            let rows: Vec<String> = sqlx::query_scalar(trusted_sql!(
                "select '{side}: ' || row_to_json(d)::text from
                   (select {cols} from {a} except all select {cols} from {b} limit 5) d"
            ))
            .fetch_all(&mut *conn)
            .await?;
            samples.extend(rows);
        }
    }
    Ok(TableReport {
        projection: p.name(),
        table: t.name,
        live_rows,
        rebuilt_rows,
        only_live,
        only_rebuilt,
        samples,
    })
}

async fn count(conn: &mut PgConnection, sql: String) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(conn)
        .await?)
}
