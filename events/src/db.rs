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

/// True when the error comes from PostgreSQL being out of reach (down,
/// restarting, refusing connections, or the pool timing out waiting for
/// one): retrying later may succeed; retrying now will not.
pub fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (08…), and the server shutting down or not yet
        // accepting connections (57P01–57P03).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// [`unavailable`] for an error or anything in its chain of sources.
pub fn unavailable_in(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<sqlx::Error>().is_some_and(unavailable) {
            return true;
        }
        cause = c.source();
    }
    false
}
