//! Black-box and integration tests against real PostgreSQL, Redis and S3.

mod access;
mod audit;
mod billing;
mod browser;
mod catalog;
mod credits;
mod event_store;
mod generations;
mod harness;
mod hostile;
mod http;
mod openapi;
mod outage;
mod privacy;
mod projections;
mod services;
mod sessions;
mod stripe;
mod worker;
