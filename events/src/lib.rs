//! slate-events: the event catalog, the event store, the projections and the
//! domain commands (accounts, credits). No HTTP, no provider.

/// SQL formatted from trusted, static pieces of this crate (table prefixes,
/// column lists), never from input.
macro_rules! trusted_sql {
    ($($t:tt)*) => { sqlx::AssertSqlSafe(format!($($t)*)) };
}

pub mod access;
pub mod accounts;
pub mod affiliates;
pub mod batch;
pub mod catalog;
pub mod credits;
pub mod db;
pub mod error;
pub mod generations;
pub mod histogram;
pub mod impersonation;
pub mod mfa;
pub mod moderation;
pub mod projections;
pub mod sessions;
pub mod store;
pub mod stripe;
pub mod tail;
pub mod vault;

pub use catalog::{Actor, DomainEvent, Metadata};
pub use error::Error;
pub use store::{ExpectedVersion, NewEvent, RecordedEvent};
