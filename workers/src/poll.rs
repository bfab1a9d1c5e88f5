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
//! The notifications come through one `LISTEN` connection per process
//! ([`Wakeups`]), on a task of its own. Until the twenty-first session each
//! worker had its own listener (apalis-postgres's `Pubsub`), polled only
//! when the worker looked for jobs: seven to ten `LISTEN` connections held
//! from the process's pool of 20 (seven in an idle process), and a worker
//! whose slots were all busy left its listener's connection attempt unread
//! half-way through the handshake,
//! which kept a PostgreSQL backend waiting for it (up to
//! `authentication_timeout`, 60 s, through a restart of the server).
//!
//! The queue's own bookkeeping (fetch, lock, completion, heartbeat) goes
//! through [`queue_pool`], whose transactions commit without waiting for
//! their WAL flush. How many jobs a fetch takes: see [`crate::queue`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{BackendExt, PollSnapshot, PollStrategy, PollWith};
use apalis_postgres::Config;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;

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
pub type Backend<T> = PollWith<QueueStorage<T>, Looks>;

/// The storage of `queue` with `config` (whose queue must be `queue`),
/// woken by `wakeups`' notifications of `queue`, a re-check after them and
/// the safety net. Its bookkeeping goes through `queue_pool` (see
/// [`queue_pool`]).
pub fn backend<T>(
    wakeups: &Wakeups,
    queue_pool: &PgPool,
    queue: &str,
    config: Config,
) -> Backend<T> {
    QueueStorage::<T>::new(queue_pool, config)
        .poll_with_strategy(Looks::new(wakeups, queue, RECHECK, SAFETY_NET))
}

/// `backend` for a worker that runs at most `slots` jobs at once (give it
/// `.concurrency(slots)`): each fetch takes only as many jobs as it has
/// free slots (see [`crate::queue`]).
pub fn limited<T>(backend: &Backend<T>, slots: usize) -> Backend<T> {
    let mut limited = backend.clone();
    limited.limit(slots);
    limited
}

/// The process's one `LISTEN` connection for job notifications, read by a
/// task of its own whatever the workers are doing, and handed to each
/// queue's subscribers. Cheap to clone; the task (and its connection) ends
/// when the last clone is dropped.
///
/// When the connection is lost (PostgreSQL restarting) the task connects
/// again, 0.25 s after a failure, doubling to 5 s, and then wakes every
/// subscriber: notifications sent meanwhile were lost.
#[derive(Clone)]
pub struct Wakeups {
    subscribers: Arc<Mutex<Subscribers>>,
    _listening: Arc<Listening>,
}

type Subscribers = HashMap<String, Vec<mpsc::Sender<()>>>;

/// Stops the listening task when dropped.
struct Listening(tokio::task::AbortHandle);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Wakeups {
    /// Listen on `pool` (the listener holds one of its connections).
    pub fn start(pool: PgPool) -> Self {
        let subscribers = Arc::new(Mutex::new(Subscribers::new()));
        let task = tokio::spawn(listen(pool, Arc::downgrade(&subscribers)));
        Self {
            subscribers,
            _listening: Arc::new(Listening(task.abort_handle())),
        }
    }

    /// A receiver woken (at most one wake-up waiting) by every notification
    /// of `queue` and by every reconnection.
    pub fn subscribe(&self, queue: &str) -> mpsc::Receiver<()> {
        subscribe_to(&self.subscribers, queue)
    }
}

fn subscribe_to(subscribers: &Mutex<Subscribers>, queue: &str) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    lock(subscribers)
        .entry(queue.to_owned())
        .or_default()
        .push(tx);
    rx
}

fn lock(subscribers: &Mutex<Subscribers>) -> std::sync::MutexGuard<'_, Subscribers> {
    subscribers.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wake the subscribers of `queue` (of every queue when `None`); forget
/// those whose receiver is gone. False once nobody holds the `Wakeups`.
fn wake(subscribers: &Weak<Mutex<Subscribers>>, queue: Option<&str>) -> bool {
    let Some(subscribers) = subscribers.upgrade() else {
        return false;
    };
    let mut subscribers = lock(&subscribers);
    for (name, senders) in subscribers.iter_mut() {
        if queue.is_some_and(|q| q != name) {
            continue;
        }
        // A full channel already holds a wake-up.
        senders.retain(|tx| !matches!(tx.try_send(()), Err(mpsc::error::TrySendError::Closed(()))));
    }
    true
}

/// The listening task: connect, `LISTEN`, hand each notification to its
/// queue's subscribers; after a lost connection, connect again and wake
/// everyone.
async fn listen(pool: PgPool, subscribers: Weak<Mutex<Subscribers>>) {
    #[derive(serde::Deserialize)]
    struct Inserted {
        job_type: String,
    }
    let mut pause = Duration::from_millis(250);
    let mut failures = 0u32;
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(crate::jobs::CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        match connected {
            Ok(mut listener) => {
                if failures > 0 {
                    tracing::info!(failures, "listening for job notifications again");
                }
                (pause, failures) = (Duration::from_millis(250), 0);
                // Anything enqueued while nobody listened was not heard.
                if !wake(&subscribers, None) {
                    return;
                }
                loop {
                    let alive = match listener.try_recv().await {
                        Ok(Some(n)) => match serde_json::from_str::<Inserted>(n.payload()) {
                            Ok(i) => wake(&subscribers, Some(&i.job_type)),
                            Err(_) => true,
                        },
                        // The connection was lost; the next call reconnects.
                        Ok(None) => wake(&subscribers, None),
                        Err(_) => break,
                    };
                    if !alive {
                        return;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                // Once per outage, not at every attempt.
                if failures == 1 {
                    tracing::warn!(error = %e, "cannot listen for job notifications; trying again (workers still poll every second)");
                }
            }
        }
        if subscribers.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// When one worker looks for jobs: at each notification of its queue and
/// `recheck` after ([`NotifyThenRecheck`]), and at least every
/// `safety_net`. Each clone (each worker: a queue's fetchers, a restart) has
/// wake-ups of its own.
///
/// apalis's `Strategy` combinator, used until the thirty-eighth session,
/// shares its strategies between clones (an `Arc`). A receiver or a timer
/// keeps one waker, the last poller's, so of a queue's four generation
/// fetchers only the one that polled last was woken, and the others lived
/// on their own heartbeat timers. apalis-core polls that timer only between
/// fetches (`Persisted::poll_ready` in `State::Ready`): one that fired
/// during a fetch woke the worker once, for nothing, and never again. A
/// fetcher in that state whose wake-ups a sibling had taken over was never
/// polled again: no heartbeat, no fetch, no error (the silent worker of
/// docs/CHAOS.md). `crate::queue` also polls the timer after an empty
/// fetch now. And apalis's interval re-armed itself without polling the new
/// timer, so after each tick it woke nobody until something else had.
pub struct Looks {
    notified: NotifyThenRecheck,
    safety_net: Duration,
    tick: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Looks {
    pub fn new(wakeups: &Wakeups, queue: &str, recheck: Duration, safety_net: Duration) -> Self {
        Self {
            notified: NotifyThenRecheck::new(wakeups, queue, recheck),
            // Never zero: a timer re-armed at "now" would fire at once, and
            // its loop below would not end.
            safety_net: safety_net.max(Duration::from_millis(1)),
            tick: None,
        }
    }
}

impl Clone for Looks {
    fn clone(&self) -> Self {
        Self {
            notified: self.notified.clone(),
            safety_net: self.safety_net,
            tick: None,
        }
    }
}

impl PollStrategy for Looks {
    fn poll_drive(&mut self, cx: &mut Context<'_>, snapshot: &PollSnapshot) -> Poll<Option<()>> {
        // Both, every time: each must hold this worker's waker.
        let notified = self.notified.poll_drive(cx, snapshot).is_ready();
        let mut ticked = false;
        let tick = self
            .tick
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(self.safety_net)));
        // A timer that fired is set again and polled, so that it wakes
        // this worker at its next tick whatever else does.
        while tick.as_mut().poll(cx).is_ready() {
            ticked = true;
            let next = tokio::time::Instant::now() + self.safety_net;
            tick.as_mut().reset(next);
        }
        if notified || ticked {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// Wakes the worker on every notification of its queue (all that are
/// waiting count as one) and once more `recheck` after the last of them.
/// Costs nothing while the queue is idle. Subscribes at its first poll, so
/// that each clone (each worker) has its own wake-ups.
pub struct NotifyThenRecheck {
    wakeups: Wakeups,
    queue: String,
    notified: Option<mpsc::Receiver<()>>,
    recheck: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl NotifyThenRecheck {
    pub fn new(wakeups: &Wakeups, queue: &str, recheck: Duration) -> Self {
        Self {
            wakeups: wakeups.clone(),
            queue: queue.to_owned(),
            notified: None,
            recheck,
            timer: None,
        }
    }
}

impl Clone for NotifyThenRecheck {
    fn clone(&self) -> Self {
        Self::new(&self.wakeups, &self.queue, self.recheck)
    }
}

impl PollStrategy for NotifyThenRecheck {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let notified = self
            .notified
            .get_or_insert_with(|| self.wakeups.subscribe(&self.queue));
        // Take the waiting wake-up; ends on Pending, so the receiver stays
        // registered to wake this task.
        let mut wake = false;
        while let Poll::Ready(Some(())) = notified.poll_recv(cx) {
            wake = true;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Waker};
    use std::time::Duration;

    use apalis::prelude::{PollSnapshot, PollStrategy};

    use super::{Looks, RECHECK, Subscribers, Wakeups, subscribe_to as subscribe, wake};

    struct Woken(AtomicUsize);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Each clone (each worker of a queue) is woken by its own safety net,
    /// tick after tick. (apalis's `Strategy`, shared by its clones, woke
    /// only the one that polled last, and its interval, once fired, woke
    /// nobody until something else had polled it.)
    #[tokio::test]
    async fn every_clone_is_woken_by_its_own_safety_net_at_every_tick() {
        // Nothing to listen to: only the safety net wakes.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let wakeups = Wakeups::start(pool);
        let first = Looks::new(&wakeups, "q", RECHECK, Duration::from_millis(100));
        let mut looks = [first.clone(), first.clone(), first];
        let woken: Vec<Arc<Woken>> = (0..3)
            .map(|_| Arc::new(Woken(AtomicUsize::new(0))))
            .collect();
        for tick in 1..=3 {
            for (l, w) in looks.iter_mut().zip(&woken) {
                let waker = Waker::from(w.clone());
                let _ = l.poll_drive(&mut Context::from_waker(&waker), &PollSnapshot::default());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let counts: Vec<usize> = woken.iter().map(|w| w.0.load(Ordering::SeqCst)).collect();
            assert!(
                counts.iter().all(|&n| n >= tick),
                "after tick {tick}, wake-ups per clone: {counts:?}"
            );
        }
    }

    #[test]
    fn a_notification_wakes_its_queue_once_and_forgets_the_gone() {
        let subs = Arc::new(Mutex::new(Subscribers::new()));
        let (mut a1, a2, mut b) = (
            subscribe(&subs, "a"),
            subscribe(&subs, "a"),
            subscribe(&subs, "b"),
        );
        drop(a2);
        let weak = Arc::downgrade(&subs);
        assert!(wake(&weak, Some("a")));
        assert!(wake(&weak, Some("a")), "a full channel is no error");
        assert_eq!(a1.try_recv(), Ok(()));
        assert!(a1.try_recv().is_err(), "one wake-up waits, not two");
        assert!(b.try_recv().is_err(), "another queue's notification");
        assert_eq!(
            subs.lock().unwrap()["a"].len(),
            1,
            "the dropped one is forgotten"
        );
        // A reconnection wakes every queue.
        assert!(wake(&weak, None));
        assert_eq!((a1.try_recv(), b.try_recv()), (Ok(()), Ok(())));
        drop(subs);
        assert!(!wake(&weak, None), "nobody holds the wake-ups any more");
    }
}
