//! Stripe at the HTTP edge: webhook verification and the API client.

pub mod billing;
pub mod reconcile;
pub mod signature;
pub mod webhook;

/// A Stripe object id that may go into a request's path or query.
pub(crate) fn is_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
