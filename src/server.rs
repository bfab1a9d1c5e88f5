//! `slate serve`.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::http::{AppState, router};

pub async fn build_state(config: Config) -> anyhow::Result<AppState> {
    let pool = slate_events::db::connect(
        config.database_url.expose(),
        config.database_max_connections,
    )
    .await
    .context("connecting to PostgreSQL")?;
    let redis = redis::Client::open(config.redis_url.expose()).context("REDIS_URL")?;
    let stripe = config.stripe_client()?;
    Ok(AppState {
        pool,
        redis,
        stripe,
        config: Arc::new(config),
    })
}

/// Serve on `listener` until `shutdown` resolves, then drain.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("HTTP server")
}
