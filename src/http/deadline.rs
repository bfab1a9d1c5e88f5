//! A request's body has a deadline: `request_read` from the handler's first
//! read of it (hyper bounds the headers themselves, see `server::serve`). A
//! client trickling a body in would otherwise hold its connection, and
//! whatever the handler holds while it reads, for as long as it likes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::AppState;
use super::error::ApiError;

#[derive(Debug)]
struct BodyTimedOut;

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimedOut {}

/// Wraps the body so that reading it fails once the deadline passes; a
/// handler whose body read failed that way answers whatever it maps a body
/// error to, and the answer is replaced by 408 `request_timeout` (handlers
/// read their body before they act, so nothing was done).
pub(super) async fn read_deadline(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let timed_out = Arc::new(AtomicBool::new(false));
    let flag = timed_out.clone();
    // From the handler's first read: a handler that reads late (its own
    // checks took their time) must not find a body the client sent at once
    // already out of time.
    let read = state.config.request_read;
    let mut sleep: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let (parts, body) = req.into_parts();
    let mut data = body.into_data_stream();
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| {
        if flag.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(read)));
        match data.poll_next_unpin(cx) {
            Poll::Pending => {}
            ready => return ready.map(|item| item.map(|r| r.map_err(axum::BoxError::from))),
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                flag.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(axum::BoxError::from(BodyTimedOut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }));
    let response = next.run(Request::from_parts(parts, body)).await;
    if timed_out.load(Ordering::Relaxed) {
        let mut r = ApiError::client(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time",
        )
        .into_response();
        // The rest of the body is not read: the connection cannot carry
        // another request.
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return r;
    }
    response
}
