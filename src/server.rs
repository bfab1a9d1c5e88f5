//! `slate serve`.

use std::future::Future;

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
    AppState::new(config, pool)
}

/// Serve on `listener` until `shutdown` resolves, then drain.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("HTTP server")
}
