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
///
/// hyper's own loop rather than `axum::serve`, which sets no timer: without
/// one a connection that never finishes its headers, or sits idle between
/// requests, is held for ever. Here a client has `request_read` for each
/// request's headers (an idle kept-alive connection is closed then), and
/// the body has as long again from its first read (`http::deadline`).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let read = state.config.request_read;
    let app = router(state);
    // HTTP/1.1 alone, as before (axum's `http1` feature).
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(read);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service =
            app.clone()
                .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    req
                });
        let conn = http.serve_connection(
            TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// As hyper and axum do: a connection that failed before it was accepted is
/// the client's business; anything else (out of file descriptors) is logged
/// and the loop waits a second before accepting again.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}
