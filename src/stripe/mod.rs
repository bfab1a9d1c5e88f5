//! Stripe at the HTTP edge: webhook verification and the API client.

pub mod billing;
pub mod reconcile;
pub mod signature;
pub mod webhook;
