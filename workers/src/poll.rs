//! When a worker looks for jobs.
//!
//! apalis-postgres's own `.with_pubsub()` wakes a worker on each insert
//! notification, but a notification that arrives while a fetch is already
//! in flight is consumed by that fetch's wake-up, and if the fetch's snapshot
//! predates the job's commit the job waits for the next heartbeat (5 s): about
//! 1 pickup in 100 on an idle queue. A job whose pushing transaction crossed
//! a second boundary sends no notification at all (the trigger compares its
//! whole-second `run_at` with the transaction's start). [`backend`] keeps the
//! notifications and adds two wake-ups: one `RECHECK` after the last
//! notification (so a swallowed one still leads to a fetch that sees its
//! job), and a slow `SAFETY_NET` interval for a job that never notified.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{BackendExt, PollSnapshot, PollStrategy, PollWith, Strategy};
use apalis_postgres::{Config, PostgresStorage, Pubsub};
use futures::StreamExt;
use sqlx::PgPool;

/// A fetch this long after the last notification.
pub const RECHECK: Duration = Duration::from_millis(10);
/// A fetch at least this often, notified or not.
pub const SAFETY_NET: Duration = Duration::from_secs(1);

/// A queue's storage as every Slate worker polls it.
pub type Backend<T> = PollWith<PostgresStorage<T>, Strategy>;

/// The storage of `queue` with `config` (whose queue must be `queue`),
/// woken by notifications, a re-check after them and the safety net.
pub fn backend<T>(pool: &PgPool, queue: &str, config: Config) -> Backend<T> {
    PostgresStorage::<T>::new(pool)
        .with_config(config)
        .poll_with_strategy(
            Strategy::new()
                .apply(NotifyThenRecheck::new(pool, queue, RECHECK))
                .interval(SAFETY_NET),
        )
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
