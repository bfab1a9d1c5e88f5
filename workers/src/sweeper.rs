//! The credit sweeper: lapses expired buckets and releases holds that nothing
//! resolved in time, so credits are never stranded. Safe to run in every
//! worker process at once (the stored functions serialize sweepers).

use chrono::{DateTime, Utc};
use slate_events::credits;
use sqlx::PgPool;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub holds_released: i32,
    pub buckets_expired: i32,
    pub generations_past_deadline: usize,
    pub audit_entries_dropped: u64,
}

/// One sweep at `now` (injected by tests).
pub async fn sweep(pool: &PgPool, now: DateTime<Utc>) -> anyhow::Result<SweepReport> {
    let generations_past_deadline = crate::generations::cancel_overdue(pool, now).await?;
    let mut tx = pool.begin().await?;
    let holds_released = credits::release_stale_holds(&mut tx, now).await?;
    tx.commit().await?;
    let mut tx = pool.begin().await?;
    let buckets_expired = credits::expire(&mut tx, now).await?;
    tx.commit().await?;
    let mut conn = pool.acquire().await?;
    let audit_entries_dropped =
        slate_events::projections::audit::apply_retention(&mut conn, now).await?;
    drop(conn);
    Ok(SweepReport {
        holds_released,
        buckets_expired,
        generations_past_deadline,
        audit_entries_dropped,
    })
}
