//! The log's tail, polled. Readers that wait for new events (the projectors,
//! the SSE streams) watch the highest committed `global_position` instead of
//! LISTEN/NOTIFY: a NOTIFY serializes every notifying commit in the database
//! (see the migration that dropped the trigger). One cheap index lookup per
//! interval per process.
//!
//! A transaction that commits after a later position was already visible
//! does not move the tail; readers therefore also look again on a slower
//! timer of their own.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

/// How often the tail is read.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// Start polling the tail (needs a Tokio runtime); the task ends when every
/// receiver is gone or the pool is closed.
pub fn watch(pool: PgPool, every: Duration) -> watch::Receiver<i64> {
    let (tx, rx) = watch::channel(0i64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            match sqlx::query_scalar::<_, i64>(
                "select coalesce(max(global_position), 0) from events",
            )
            .fetch_one(&pool)
            .await
            {
                Ok(tail) => {
                    tx.send_if_modified(|seen| {
                        let moved = *seen != tail;
                        *seen = tail;
                        moved
                    });
                }
                // The process closed its pool (it is shutting down): nothing
                // is left to watch. Receivers see the watch close.
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the log's tail failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    rx
}
