//! One LISTEN connection per process, fanned out to every open event
//! stream: a commit that appended events wakes them, and each reads what is
//! new in its own stream.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

pub struct EventsHub {
    tx: broadcast::Sender<()>,
}

impl EventsHub {
    /// Start listening in the background (needs a Tokio runtime).
    pub fn start(pool: PgPool) -> Arc<Self> {
        let (tx, _) = broadcast::channel(64);
        let hub = Arc::new(Self { tx: tx.clone() });
        tokio::spawn(async move {
            loop {
                match listen(&pool, &tx).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener lost; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        hub
    }

    pub fn subscribe(&self) -> broadcast::Receiver<()> {
        self.tx.subscribe()
    }
}

async fn listen(pool: &PgPool, tx: &broadcast::Sender<()>) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("slate_events").await?;
    loop {
        listener.recv().await?;
        if tx.receiver_count() > 0 {
            let _ = tx.send(());
        }
    }
}
