//! The HTTP API: one `router()` per module, merged here.

mod account;
mod admin;
mod audit;
mod billing;
mod console;
mod credits;
mod deadline;
mod debug_bodies;
mod error;
mod extract;
#[doc(hidden)]
pub mod fuzzing;
mod generations;
mod headers;
mod health;
pub mod hub;
mod keys;
mod metrics;
pub mod openapi;
pub mod scoped;
mod sessions;
mod stripe;
pub mod telemetry;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderName, Request};
use sqlx::PgPool;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use error::ApiError;
pub use extract::{Auth, ClientIp, Form, Json, Path, Query, Staff};

use crate::config::Config;

/// Everything a handler may need, behind one `Arc`: the state is cloned
/// for every request (by each route layer and by the handler), and a clone
/// is one reference-count increment instead of a dozen.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Services {
    pub pool: PgPool,
    pub redis: redis::Client,
    pub config: Arc<Config>,
    /// The Stripe API client, when a key is configured.
    pub stripe: Option<::stripe::Client>,
    pub storage: slate_workers::storage::Storage,
    pub limiter: Arc<crate::ratelimit::RateLimiter>,
    /// The providers offered to users, and their names.
    pub providers: Arc<slate_workers::providers::Providers>,
    pub provider_names: Arc<Vec<String>>,
    /// Wakes event streams when events are committed.
    pub hub: Arc<hub::EventsHub>,
    /// Request counters and latency histograms of this process.
    pub http_metrics: Arc<telemetry::HttpMetrics>,
    /// Verified Stripe deliveries this process stored.
    pub stripe_deliveries: Arc<telemetry::StripeDeliveries>,
    /// Standalone appends (audit records of requests), committed in groups.
    pub appends: slate_events::store::GroupCommit,
    /// Verified Stripe deliveries, committed in groups.
    pub stripe_ingest: slate_workers::stripe::IngestBatcher,
}

impl AppState {
    /// Build the state from configuration and a pool.
    pub fn new(config: Config, pool: PgPool) -> anyhow::Result<Self> {
        let redis = redis::Client::open(config.redis_url.expose())?;
        let stripe = config.stripe_client()?;
        let providers = slate_workers::providers::Providers::new(&config.providers)?;
        Ok(Self(Arc::new(Services {
            storage: slate_workers::storage::Storage::new(&config.storage()),
            limiter: Arc::new(crate::ratelimit::RateLimiter::new(redis.clone())),
            provider_names: Arc::new(providers.names().map(str::to_owned).collect()),
            providers: Arc::new(providers),
            hub: hub::EventsHub::start(pool.clone()),
            http_metrics: Arc::new(telemetry::HttpMetrics::default()),
            stripe_deliveries: Arc::default(),
            stripe_ingest: slate_workers::stripe::ingest_batcher(pool.clone()),
            appends: slate_events::store::GroupCommit::start(pool.clone(), Default::default()),
            pool,
            redis,
            stripe,
            config: Arc::new(config),
        })))
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Every response under an impersonation carries a header the client shows
/// as a banner (filled in by the Auth extractor).
async fn impersonation_banner(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let slot = extract::ImpersonationSlot::default();
    req.extensions_mut().insert(slot.clone());
    let mut response = next.run(req).await;
    let banner = slot.0.lock().ok().and_then(|s| s.clone());
    if let Some(banner) = banner
        && let Ok(v) = axum::http::HeaderValue::from_str(&banner)
    {
        response
            .headers_mut()
            .insert(HeaderName::from_static(extract::BANNER_HEADER), v);
    }
    response
}

/// Unknown paths answer in Slate's error format too.
async fn unknown_route() -> ApiError {
    ApiError::not_found()
}

async fn method_not_allowed() -> ApiError {
    ApiError::client(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

pub fn router(state: AppState) -> Router {
    let public_https = state.config.public_url.starts_with("https://");
    Router::new()
        .merge(health::router())
        .merge(metrics::router())
        .merge(openapi::router())
        .merge(stripe::router())
        .merge(billing::router())
        .merge(credits::router())
        .merge(generations::router())
        .merge(keys::router())
        .merge(account::router())
        .merge(sessions::router())
        .merge(admin::router())
        .merge(audit::router())
        .merge(console::router())
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            debug_bodies::log_bodies,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            deadline::read_deadline,
        ))
        // A layer, not a route layer: unknown routes (404) and wrong methods
        // (405) are counted too, as "unmatched" and on their route.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            telemetry::record,
        ))
        .with_state(state)
        .layer(axum::middleware::from_fn(impersonation_banner))
        .layer(axum::middleware::from_fn(move |req, next| {
            headers::security_headers(public_https, req, next)
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::from_fn(sanitize_request_id))
}

/// The span of one request: method, route and request id, never bodies or
/// headers. It is made at ERROR level so that no `RUST_LOG` short of `off`
/// filters it out: a span's level only decides whether it exists, and a
/// warning logged inside a filtered-out span would lose its request id.
pub fn request_span<B>(req: &Request<B>) -> tracing::Span {
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
    tracing::error_span!(
        "request",
        method = %req.method(),
        route,
        request_id,
        account_id = tracing::field::Empty
    )
}

/// A client may name its request (`x-request-id`), and that id goes into
/// every log line and audit entry of the request: only a short token of
/// safe characters is kept, anything else is replaced by a fresh id, so a
/// header cannot forge log fields or smuggle markup.
async fn sanitize_request_id(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let ok = |v: &axum::http::HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    };
    let headers = req.headers_mut();
    if headers.get_all(&REQUEST_ID).iter().count() > 1
        || headers.get(&REQUEST_ID).is_some_and(|v| !ok(v))
    {
        headers.remove(&REQUEST_ID);
    }
    next.run(req).await
}
