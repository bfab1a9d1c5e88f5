//! Group commit: callers that arrive together share one transaction.
//!
//! A [`Batcher`] queues items from any number of concurrent callers; a few
//! writer tasks each take what is waiting (up to `max_batch`, never waiting
//! for more to arrive) and write it with one [`BatchWrite::write`], which
//! commits before it answers. While one batch commits the next one gathers,
//! so under load a commit (one WAL flush, one round of locks) carries many
//! callers' writes, and alone a caller pays no added delay. Every caller
//! gets its own outcome, only after the commit that made it durable.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

/// How a batch is written. `write` must return one outcome per item, in
/// order, and must only report success for an item whose write committed.
pub trait BatchWrite: Send + Sync + 'static {
    type Item: Send + 'static;
    type Output: Send + 'static;
    type Error: From<Closed> + Send + 'static;

    fn write(
        &self,
        items: Vec<Self::Item>,
    ) -> impl Future<Output = Vec<Result<Self::Output, Self::Error>>> + Send;

    /// When `outcome` (a write's first) says the store is out of reach, the
    /// answer for one item that was already waiting when that write ended.
    /// Under an outage a write takes the pool's whole acquire timeout to find
    /// out; without this, an item queued behind busy writers would wait for
    /// one of them and then for a write of its own, twice that long. With
    /// it, no caller waits for more than one failed write. By default items
    /// are never refused.
    fn refusal(&self, _outcome: &Result<Self::Output, Self::Error>) -> Option<Self::Error> {
        None
    }
}

/// The batcher's writers are gone (the runtime is shutting down) or a writer
/// returned too few outcomes.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the group-commit writer is not running")]
pub struct Closed;

#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Concurrent writer tasks (each holds one connection while it writes).
    pub writers: usize,
    /// Most items in one transaction.
    pub max_batch: usize,
}

impl Default for BatchOptions {
    /// Two writers: one commits while the other gathers. More writers take
    /// smaller batches, so each commit carries fewer callers and PostgreSQL's
    /// CPU goes into more statements and commits: `slate bench --only
    /// appends --group-writers N` at 32 callers (2026-12-03, alternating)
    /// 1.00-1.03 of the ceiling with 4, 0.80-0.84 with 8, 1.23-1.28 with 2,
    /// 1.22-1.27 with 1 (which loses at 8 callers).
    fn default() -> Self {
        Self {
            writers: 2,
            max_batch: 128,
        }
    }
}

type Request<W> = (
    <W as BatchWrite>::Item,
    oneshot::Sender<Result<<W as BatchWrite>::Output, <W as BatchWrite>::Error>>,
);

/// A handle to submit items; cheap to clone. The writer tasks end when the
/// last handle is dropped.
pub struct Batcher<W: BatchWrite> {
    queue: mpsc::UnboundedSender<Request<W>>,
}

impl<W: BatchWrite> Clone for Batcher<W> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<W: BatchWrite> Batcher<W> {
    /// Start the writer tasks on the current tokio runtime.
    pub fn start(writer: W, options: BatchOptions) -> Self {
        let (queue, rx) = mpsc::unbounded_channel::<Request<W>>();
        let rx = Arc::new(Mutex::new(rx));
        let writer = Arc::new(writer);
        for _ in 0..options.writers.max(1) {
            let rx = rx.clone();
            let writer = writer.clone();
            let max = options.max_batch.max(1);
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else {
                            return;
                        };
                        let mut batch = vec![first];
                        while batch.len() < max {
                            match rx.try_recv() {
                                Ok(r) => batch.push(r),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let outcomes = writer.write(items).await;
                    // What waits now waited through this write. The lock is
                    // free unless another writer is gathering, and then that
                    // writer takes what waits (nothing waited behind it).
                    if let Some(first) = outcomes.first()
                        && let Some(mut refusal) = writer.refusal(first)
                        && let Ok(mut rx) = rx.try_lock()
                    {
                        while let Ok((_, reply)) = rx.try_recv() {
                            let _ = reply.send(Err(refusal));
                            let Some(next) = writer.refusal(first) else {
                                break;
                            };
                            refusal = next;
                        }
                    }
                    let mut outcomes = outcomes.into_iter();
                    for reply in replies {
                        // A caller that went away no longer needs its answer.
                        // (`unwrap_or_else`: an error made eagerly for every
                        // reply was an anyhow error with a captured backtrace
                        // per webhook delivery under RUST_BACKTRACE=1.)
                        let _ = reply.send(outcomes.next().unwrap_or_else(|| Err(Closed.into())));
                    }
                }
            });
        }
        Self { queue }
    }

    /// Queue `item` and wait for its outcome (after its commit).
    pub async fn submit(&self, item: W::Item) -> Result<W::Output, W::Error> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((item, reply))
            .map_err(|_| W::Error::from(Closed))?;
        answer.await.map_err(|_| W::Error::from(Closed))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Sum {
        batches: AtomicUsize,
    }

    #[derive(Debug)]
    struct E;
    impl From<Closed> for E {
        fn from(_: Closed) -> Self {
            E
        }
    }

    impl BatchWrite for Sum {
        type Item = u32;
        type Output = u32;
        type Error = E;
        async fn write(&self, items: Vec<u32>) -> Vec<Result<u32, E>> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            items
                .into_iter()
                .map(|i| if i == 7 { Err(E) } else { Ok(i * 2) })
                .collect()
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_batches_and_get_their_own_outcome() {
        let batcher = Batcher::start(
            Sum {
                batches: AtomicUsize::new(0),
            },
            BatchOptions {
                writers: 1,
                max_batch: 64,
            },
        );
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let b = batcher.clone();
            tasks.push(tokio::spawn(async move { (i, b.submit(i).await) }));
        }
        for t in tasks {
            let (i, r) = t.await.unwrap();
            match r {
                Ok(v) => assert_eq!(v, i * 2),
                Err(E) => assert_eq!(i, 7),
            }
        }
    }

    /// Every write finds the store out of reach, when the test lets it end.
    struct Down(Arc<Gate>);

    struct Gate {
        writes: AtomicUsize,
        open: tokio::sync::Semaphore,
    }

    impl BatchWrite for Down {
        type Item = u32;
        type Output = u32;
        type Error = E;
        async fn write(&self, items: Vec<u32>) -> Vec<Result<u32, E>> {
            self.0.writes.fetch_add(1, Ordering::SeqCst);
            self.0.open.acquire().await.unwrap().forget();
            items.into_iter().map(|_| Err(E)).collect()
        }

        fn refusal(&self, outcome: &Result<u32, E>) -> Option<E> {
            outcome.as_ref().err().map(|_| E)
        }
    }

    async fn until(what: impl Fn() -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !what() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("in time");
    }

    #[tokio::test]
    async fn items_waiting_through_an_out_of_reach_write_are_refused_without_a_write() {
        let gate = Arc::new(Gate {
            writes: AtomicUsize::new(0),
            open: tokio::sync::Semaphore::new(0),
        });
        let batcher = Batcher::start(
            Down(gate.clone()),
            BatchOptions {
                writers: 2,
                max_batch: 64,
            },
        );
        let submit = |i: u32| {
            let b = batcher.clone();
            tokio::spawn(async move { b.submit(i).await })
        };
        // Both writers busy, two more callers waiting behind them.
        let first = submit(1);
        until(|| gate.writes.load(Ordering::SeqCst) == 1).await;
        let second = submit(2);
        until(|| gate.writes.load(Ordering::SeqCst) == 2).await;
        let waiting = [submit(3), submit(4)];
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // The first write ends out of reach: the waiting callers get their
        // answer with it, and no write of their own.
        gate.open.add_permits(1);
        assert!(first.await.unwrap().is_err());
        for w in waiting {
            assert!(w.await.unwrap().is_err());
        }
        assert_eq!(gate.writes.load(Ordering::SeqCst), 2);
        assert!(!second.is_finished());
        gate.open.add_permits(1);
        assert!(second.await.unwrap().is_err());
        assert_eq!(gate.writes.load(Ordering::SeqCst), 2);
    }
}
