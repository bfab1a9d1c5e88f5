//! Per-process HTTP request counters and latency histograms for `/metrics`,
//! and the count of verified Stripe deliveries.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;

/// Upper bounds (seconds) of the latency buckets.
pub const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

#[derive(Default)]
struct Series {
    by_status: BTreeMap<u16, u64>,
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Series by route, then by method: looked up by `&str`, so a request
/// allocates nothing once its route has been seen.
#[derive(Default)]
pub struct HttpMetrics {
    routes: Mutex<BTreeMap<String, BTreeMap<String, Series>>>,
}

impl HttpMetrics {
    fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut routes = self.routes.lock().expect("not poisoned");
        let s = slot(slot(&mut routes, route), method);
        *s.by_status.entry(status).or_default() += 1;
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                s.buckets[i] += 1;
            }
        }
        s.count += 1;
        s.sum += seconds;
    }

    /// Prometheus text for the counters and histograms.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let routes = self.routes.lock().expect("not poisoned");
        out.push_str("# HELP slate_http_requests_total HTTP requests by route and status (this process).\n# TYPE slate_http_requests_total counter\n");
        for (route, method, s) in by_method(&routes) {
            for (status, n) in &s.by_status {
                let _ = writeln!(
                    out,
                    "slate_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP slate_http_request_duration_seconds Request latency by route (this process).\n# TYPE slate_http_request_duration_seconds histogram\n");
        for (route, method, s) in by_method(&routes) {
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "slate_http_request_duration_seconds_bucket{{method=\"{method}\",route=\"{route}\",le=\"{le}\"}} {}",
                    s.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "slate_http_request_duration_seconds_bucket{{method=\"{method}\",route=\"{route}\",le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "slate_http_request_duration_seconds_sum{{method=\"{method}\",route=\"{route}\"}} {:.6}",
                s.sum
            );
            let _ = writeln!(
                out,
                "slate_http_request_duration_seconds_count{{method=\"{method}\",route=\"{route}\"}} {}",
                s.count
            );
        }
    }
}

/// Verified Stripe webhook deliveries this process stored, by whether the
/// event was new or already mirrored (Stripe retries and duplicates).
#[derive(Default)]
pub struct StripeDeliveries {
    new: AtomicU64,
    duplicate: AtomicU64,
}

impl StripeDeliveries {
    pub fn record(&self, first: bool) {
        let n = if first { &self.new } else { &self.duplicate };
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text for the counter.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("# HELP slate_stripe_deliveries_total Verified webhook deliveries stored by this process, by whether the event was already mirrored.\n# TYPE slate_stripe_deliveries_total counter\n");
        for (duplicate, n) in [(false, &self.new), (true, &self.duplicate)] {
            let _ = writeln!(
                out,
                "slate_stripe_deliveries_total{{duplicate=\"{duplicate}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

/// The entry for `key`, made (and its key allocated) only the first time.
fn slot<'m, V: Default>(map: &'m mut BTreeMap<String, V>, key: &str) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

fn by_method(
    routes: &BTreeMap<String, BTreeMap<String, Series>>,
) -> impl Iterator<Item = (&str, &str, &Series)> {
    routes.iter().flat_map(|(route, methods)| {
        methods
            .iter()
            .map(move |(m, s)| (route.as_str(), m.as_str(), s))
    })
}

/// The method as a label: a client may send any token as its method, and
/// every label value is a series kept for the life of the process.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: count and time every request, by its route template, or as
/// "unmatched" when no route matched (a 404; a wrong method on a known route,
/// 405, counts on that route).
pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    // A cheap clone (an `Arc<str>`).
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = method_label(req.method());
    let start = Instant::now();
    let response = next.run(req).await;
    state.http_metrics.record(
        method,
        route.as_ref().map_or("unmatched", MatchedPath::as_str),
        response.status().as_u16(),
        start.elapsed().as_secs_f64(),
    );
    response
}
