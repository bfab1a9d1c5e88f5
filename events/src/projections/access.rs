//! Inline projection `access`: API keys.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Table;
use crate::Error;
use crate::catalog::DomainEvent;

pub const TABLES: &[Table] = &[
    Table {
        name: "api_keys",
        // last_used_at is operational and not rebuilt from the log.
        columns: "key_id, account_id, prefix, secret_hash, label, created_at, revoked_at",
    },
    Table {
        name: "impersonations",
        columns: "impersonation_id, staff_id, account_id, reason, started_at, expires_at, ended_at",
    },
    Table {
        name: "sessions",
        // last_seen_at is operational too.
        columns: "session_id, account_id, token_hash, via, mfa_verified, created_at, expires_at, ended_at, end_reason",
    },
];

pub const EVENT_TYPES: &[&str] = &[
    "ApiKeyCreated",
    "ApiKeyRevoked",
    "SessionStarted",
    "SessionEnded",
    "SessionMfaVerified",
    "ImpersonationStarted",
    "ImpersonationEnded",
    "AccountPurged",
];

pub async fn apply(
    conn: &mut PgConnection,
    prefix: &str,
    event: &DomainEvent,
    recorded_at: DateTime<Utc>,
) -> Result<(), Error> {
    let p = prefix;
    match event {
        DomainEvent::AccountPurged(e) => {
            for table in ["api_keys", "sessions"] {
                sqlx::query(trusted_sql!("delete from {p}{table} where account_id = $1"))
                    .bind(e.account_id)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        DomainEvent::ApiKeyCreated(e) => {
            let hash = hex::decode(&e.secret_hash).map_err(|_| Error::Decode {
                event_type: "ApiKeyCreated".into(),
                schema_version: 1,
                reason: "secret_hash is not hex".into(),
            })?;
            sqlx::query(trusted_sql!(
                "insert into {p}api_keys (key_id, account_id, prefix, secret_hash, label, created_at)
                 values ($1, $2, $3, $4, $5, $6)"
            ))
            .bind(e.key_id)
            .bind(e.account_id)
            .bind(&e.prefix)
            .bind(hash)
            .bind(&e.label)
            .bind(recorded_at)
            .execute(conn)
            .await?;
        }
        DomainEvent::ApiKeyRevoked(e) => {
            sqlx::query(trusted_sql!(
                "update {p}api_keys set revoked_at = $2 where key_id = $1 and revoked_at is null"
            ))
            .bind(e.key_id)
            .bind(recorded_at)
            .execute(conn)
            .await?;
        }
        DomainEvent::SessionStarted(e) => {
            let hash = hex::decode(&e.token_hash).map_err(|_| Error::Decode {
                event_type: "SessionStarted".into(),
                schema_version: 1,
                reason: "token_hash is not hex".into(),
            })?;
            sqlx::query(trusted_sql!(
                "insert into {p}sessions (session_id, account_id, token_hash, via, created_at, expires_at)
                 values ($1, $2, $3, $4, $5, $6)"
            ))
            .bind(e.session_id)
            .bind(e.account_id)
            .bind(hash)
            .bind(&e.via)
            .bind(recorded_at)
            .bind(e.expires_at)
            .execute(conn)
            .await?;
        }
        DomainEvent::SessionEnded(e) => {
            sqlx::query(trusted_sql!(
                "update {p}sessions set ended_at = $2, end_reason = $3 where session_id = $1 and ended_at is null"
            ))
            .bind(e.session_id)
            .bind(recorded_at)
            .bind(&e.reason)
            .execute(conn)
            .await?;
        }
        DomainEvent::SessionMfaVerified(e) => {
            sqlx::query(trusted_sql!(
                "update {p}sessions set mfa_verified = true where session_id = $1"
            ))
            .bind(e.session_id)
            .execute(conn)
            .await?;
        }
        DomainEvent::ImpersonationStarted(e) => {
            sqlx::query(trusted_sql!(
                "insert into {p}impersonations (impersonation_id, staff_id, account_id, reason, started_at, expires_at)
                 values ($1, $2, $3, $4, $5, $6)"
            ))
            .bind(e.impersonation_id)
            .bind(e.staff_id)
            .bind(e.account_id)
            .bind(&e.reason)
            .bind(recorded_at)
            .bind(e.expires_at)
            .execute(conn)
            .await?;
        }
        DomainEvent::ImpersonationEnded(e) => {
            sqlx::query(trusted_sql!(
                "update {p}impersonations set ended_at = $2 where impersonation_id = $1 and ended_at is null"
            ))
            .bind(e.impersonation_id)
            .bind(recorded_at)
            .execute(conn)
            .await?;
        }
        _ => {}
    }
    Ok(())
}
