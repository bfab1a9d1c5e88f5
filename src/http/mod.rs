//! The HTTP API: one `router()` per module, merged here.

mod billing;
mod credits;
mod error;
mod extract;
mod health;
mod stripe;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, Request};
use sqlx::PgPool;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use extract::{Auth, Json};

use crate::config::Config;

/// Everything a handler may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub redis: redis::Client,
    pub config: Arc<Config>,
    /// The Stripe API client, when a key is configured.
    pub stripe: Option<::stripe::Client>,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(stripe::router())
        .merge(billing::router())
        .merge(credits::router())
        .with_state(state)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            // Spans carry method, route and request id — never bodies or headers.
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let request_id = req
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| "unmatched".into());
                tracing::info_span!(
                    "request",
                    method = %req.method(),
                    route,
                    request_id,
                    account_id = tracing::field::Empty
                )
            }),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}
