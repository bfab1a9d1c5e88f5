//! `slate migrate`: creates the database when missing, then runs the job
//! queue's migrations and Slate's own (each recorded in its own table).

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};

pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let options: PgConnectOptions = url.parse().context("DATABASE_URL")?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    match options.clone().disable_statement_logging().connect().await {
        Ok(conn) => {
            conn.close().await.ok();
            Ok(())
        }
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("3D000") => {
            let mut admin = options
                .database("postgres")
                .disable_statement_logging()
                .connect()
                .await
                .context("connecting to the postgres maintenance database")?;
            let quoted = format!("\"{}\"", name.replace('"', "\"\""));
            sqlx::query(sqlx::AssertSqlSafe(format!("create database {quoted}")))
                .execute(&mut admin)
                .await
                .or_else(
                    |e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
                        // Created meanwhile: 42P04 when the other create had
                        // committed, 23505 (the catalog's unique name index)
                        // when both were inserting the row at once.
                        Some("42P04" | "23505") => Ok(Default::default()),
                        _ => Err(e),
                    },
                )
                .context("creating the database")?;
            tracing::info!(database = %name, "database created");
            Ok(())
        }
        Err(e) => Err(e).context("connecting to PostgreSQL"),
    }
}

pub async fn run(pool: &PgPool) -> anyhow::Result<()> {
    slate_workers::jobs::migrate(pool)
        .await
        .context("job queue migrations")?;
    slate_events::db::migrator()
        .run(pool)
        .await
        .context("Slate migrations")?;
    Ok(())
}
