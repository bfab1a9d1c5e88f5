//! Slate: the HTTP API, the CLI and the wiring. Domain logic lives in
//! `slate-events`, side effects in `slate-workers`.

pub mod audit;
pub mod bench;
pub mod bench_auth;
pub mod bench_cpu;
pub mod bench_scale;
pub mod chaos;
pub mod cli;
pub mod config;
pub mod demo;
pub mod demo_story;
pub mod generations;
pub mod http;
pub mod migrate;
pub mod oidc;
pub mod ratelimit;
pub mod server;
pub mod stripe;
pub mod telemetry;

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
