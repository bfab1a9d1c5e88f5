//! When a worker looks for jobs.
//!
//! Enqueuers notify after their commit ([`crate::jobs::Wake`]; the
//! notifying trigger of apalis-postgres is dropped). apalis-postgres's own
//! `.with_pubsub()` wakes a worker on each notification, but a notification
//! that arrives while a fetch is already in flight is consumed by that
//! fetch's wake-up, and if the fetch's snapshot predates the job's commit the
//! job waits for the next heartbeat (5 s): about 1 pickup in 100 on an idle
//! queue. [`backend`] keeps the notifications and adds two wake-ups: one
//! `RECHECK` after the last notification (so a swallowed one still leads to
//! a fetch that sees its job), and a slow `SAFETY_NET` interval for a job
//! whose wake-up was lost.
//!
//! The queue's own bookkeeping (fetch, lock, completion, heartbeat) goes
//! through [`queue_pool`], whose transactions commit without waiting for
//! their WAL flush. How many jobs a fetch takes: see [`crate::queue`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{BackendExt, PollSnapshot, PollStrategy, PollWith, Strategy};
use apalis_postgres::{Config, Pubsub};
use futures::StreamExt;
use sqlx::PgPool;

use crate::queue::QueueStorage;

/// A fetch this long after the last notification.
pub const RECHECK: Duration = Duration::from_millis(10);
/// A fetch at least this often, notified or not.
pub const SAFETY_NET: Duration = Duration::from_secs(1);

/// Connections for the queue's own bookkeeping: apalis-postgres's fetch
/// (which claims jobs), its lock and completion updates, heartbeats and
/// orphan recovery. They commit with `synchronous_commit = off`: a commit
/// returns before its WAL record is flushed, so these transactions no
/// longer wait for the disk (three of a generation's six commits, nearly all
/// of a no-op job's).
///
/// What a server crash can lose is the last moments of those updates (at
/// most three `wal_writer_delay`s, 600 ms by default), never a job: a lost
/// claim or lock leaves the job to be fetched again (or recovered as an
/// orphan), a lost completion runs it again. Every handler is at-least-once
/// already (a worker can die between its effect and its completion), and a
/// handler's own writes, like every domain write and every enqueue (in the
/// caller's transaction), commit on the ordinary pool and are durable when
/// they return; a durable commit also flushes every record before it.
///
/// They also keep one plan per statement (`plan_cache_mode =
/// force_generic_plan`). The queue's statements take their jobs as arrays
/// (`id = any($1)`), for which PostgreSQL's plan cache always finds a
/// custom plan cheaper than the generic one, so it planned the lock and
/// completion updates again on every call: 0.24 and 0.34 ms per call in
/// `pg_stat_statements`, against a few µs to run them. Their generic plans
/// are the same index lookups.
pub fn queue_pool(pool: &PgPool) -> PgPool {
    let options = (*pool.connect_options()).clone().options([
        ("synchronous_commit", "off"),
        ("plan_cache_mode", "force_generic_plan"),
    ]);
    slate_events::db::pool_options()
        .max_connections(QUEUE_POOL_SIZE)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options)
}

/// Connections of [`queue_pool`]: each worker's fetch loop holds one only
/// for its statement (listeners take their own).
const QUEUE_POOL_SIZE: u32 = 8;

/// A queue's storage as every Slate worker polls it.
pub type Backend<T> = PollWith<QueueStorage<T>, Strategy>;

/// The storage of `queue` with `config` (whose queue must be `queue`),
/// woken by notifications, a re-check after them and the safety net. Its
/// bookkeeping goes through `queue_pool` (see [`queue_pool`]); the listener
/// holds a connection of `pool` (the notifications need no commit).
pub fn backend<T>(pool: &PgPool, queue_pool: &PgPool, queue: &str, config: Config) -> Backend<T> {
    QueueStorage::<T>::new(queue_pool, config).poll_with_strategy(
        Strategy::new()
            .apply(NotifyThenRecheck::new(pool, queue, RECHECK))
            .interval(SAFETY_NET),
    )
}

/// `backend` for a worker that runs at most `slots` jobs at once (give it
/// `.concurrency(slots)`): each fetch takes only as many jobs as it has
/// free slots (see [`crate::queue`]). Shares `backend`'s listener.
pub fn limited<T>(backend: &Backend<T>, slots: usize) -> Backend<T> {
    let mut limited = backend.clone();
    limited.limit(slots);
    limited
}

/// Wakes the worker on every insert notification of its queue (all that are
/// waiting count as one) and once more `recheck` after the last of them.
/// Costs nothing while the queue is idle.
pub struct NotifyThenRecheck {
    pubsub: Pubsub,
    recheck: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl NotifyThenRecheck {
    pub fn new(pool: &PgPool, queue: &str, recheck: Duration) -> Self {
        Self {
            pubsub: Pubsub::new(pool.clone(), queue.to_owned()),
            recheck,
            timer: None,
        }
    }
}

impl Clone for NotifyThenRecheck {
    fn clone(&self) -> Self {
        Self {
            pubsub: self.pubsub.clone(),
            recheck: self.recheck,
            timer: None,
        }
    }
}

impl PollStrategy for NotifyThenRecheck {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut wake = false;
        // Take every waiting notification; ends on Pending, so the listener
        // stays registered to wake this task (bounded, in case a broken
        // listener keeps answering with errors).
        for _ in 0..1024 {
            match self.pubsub.poll_next_unpin(cx) {
                Poll::Ready(Some(_)) => wake = true,
                _ => break,
            }
        }
        if wake {
            self.timer = Some(Box::pin(tokio::time::sleep(self.recheck)));
        }
        if let Some(t) = self.timer.as_mut()
            && t.as_mut().poll(cx).is_ready()
        {
            self.timer = None;
            wake = true;
        }
        if wake {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}
