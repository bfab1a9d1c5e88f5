//! Connection and migrations.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// Slate's own migrations. They are recorded in `_slate_migrations`, apart
/// from the job queue's, so each set can evolve on its own.
pub fn migrator() -> Migrator {
    let mut m = sqlx::migrate!("../migrations");
    m.dangerous_set_table_name("_slate_migrations");
    m
}

/// Connect a pool with sane timeouts; statements are never logged.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let options = options
        .application_name("slate")
        .disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}
