//! slate-workers: durable apalis job handlers, the background loops of
//! `slate work` (projectors, sweeper), provider clients and object storage.
//! Knows no axum.

pub mod bench;
pub mod diagnostics;
pub mod email;
pub mod generations;
pub mod in_flight;
pub mod jobs;
pub mod media;
pub mod poll;
pub mod providers;
pub mod purge;
pub mod queue;
pub mod renewal;
pub mod runtime;
pub mod storage;
pub mod stripe;
pub mod sweeper;
pub mod webhooks;

pub use runtime::{WorkerSettings, run};
