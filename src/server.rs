//! `slate serve`.

use std::future::Future;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::http::{AppState, router};

/// The server's state, with its pool of PostgreSQL connections.
///
/// While PostgreSQL is out of reach the server starts anyway, as it runs on
/// through an outage: `/healthz` answers, `/readyz` and anything that needs
/// the database answer 503 until it is back. Any other connection error (a
/// wrong password, a missing database) stops it.
pub async fn build_state(config: Config) -> anyhow::Result<AppState> {
    let (url, max) = (
        config.database_url.expose(),
        config.database_max_connections,
    );
    let pool = match slate_events::db::connect(url, max).await {
        Ok(pool) => pool,
        Err(e) if slate_events::db::unavailable(&e) => {
            tracing::warn!(
                error = %e,
                target = %slate_events::db::target(url),
                "PostgreSQL is out of reach; serving anyway, not ready until it answers"
            );
            slate_events::db::connect_lazy(url, max).context("the PostgreSQL settings")?
        }
        Err(e) => return Err(anyhow::Error::new(e).context("connecting to PostgreSQL")),
    };
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
