//! One watcher of the log's tail per process (`slate_events::tail`), fanned
//! out to every open event stream: when the tail moves, each stream reads
//! what is new in its own stream.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::broadcast;

pub struct EventsHub {
    tx: broadcast::Sender<()>,
}

impl EventsHub {
    /// Start watching in the background (needs a Tokio runtime).
    pub fn start(pool: PgPool) -> Arc<Self> {
        let (tx, _) = broadcast::channel(64);
        let hub = Arc::new(Self { tx: tx.clone() });
        let mut tail = slate_events::tail::watch(pool, slate_events::tail::INTERVAL);
        tokio::spawn(async move {
            while tail.changed().await.is_ok() {
                if tx.receiver_count() > 0 {
                    let _ = tx.send(());
                }
            }
        });
        hub
    }

    pub fn subscribe(&self) -> broadcast::Receiver<()> {
        self.tx.subscribe()
    }
}
