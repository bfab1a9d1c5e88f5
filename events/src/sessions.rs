//! Browser sessions: a random token in an HttpOnly cookie, only its SHA-256
//! stored; idle and absolute timeouts; a new session at every sign-in; sign
//! out here or everywhere.

use chrono::{DateTime, Duration, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Error;
use crate::catalog::{DomainEvent, Metadata, SessionEnded, SessionStarted};
use crate::store::{self, ExpectedVersion, NewEvent};

pub const COOKIE: &str = "slate_session";

fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A random token: 244 bits from two UUIDv4s.
pub fn random_token() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

pub struct NewSession {
    pub session_id: Uuid,
    /// The cookie value; exists only here and in the browser.
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

pub async fn start(
    conn: &mut PgConnection,
    account_id: Uuid,
    via: &str,
    absolute: Duration,
    metadata: Metadata,
) -> Result<NewSession, Error> {
    let session_id = Uuid::now_v7();
    let token = random_token();
    let expires_at = Utc::now() + absolute;
    let event = NewEvent::new(
        DomainEvent::SessionStarted(SessionStarted {
            account_id,
            session_id,
            token_hash: hex::encode(hash(&token)),
            via: via.to_owned(),
            expires_at,
        }),
        metadata,
    );
    store::append_and_apply(
        conn,
        &format!("session-{session_id}"),
        ExpectedVersion::NoStream,
        &event,
    )
    .await?;
    Ok(NewSession {
        session_id,
        token,
        expires_at,
    })
}

pub async fn end(
    conn: &mut PgConnection,
    account_id: Uuid,
    session_id: Uuid,
    reason: &str,
    metadata: Metadata,
) -> Result<bool, Error> {
    let open: bool = sqlx::query_scalar(
        "select exists(select 1 from sessions where session_id = $1 and account_id = $2 and ended_at is null)",
    )
    .bind(session_id)
    .bind(account_id)
    .fetch_one(&mut *conn)
    .await?;
    if !open {
        return Ok(false);
    }
    let event = NewEvent::new(
        DomainEvent::SessionEnded(SessionEnded {
            account_id,
            session_id,
            reason: reason.to_owned(),
        }),
        metadata,
    );
    store::append_and_apply(
        conn,
        &format!("session-{session_id}"),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    Ok(true)
}

/// Sign out everywhere: every open session, and every key when asked.
pub async fn end_all(
    conn: &mut PgConnection,
    account_id: Uuid,
    include_keys: bool,
    metadata: Metadata,
) -> Result<(usize, usize), Error> {
    let sessions: Vec<Uuid> = sqlx::query_scalar(
        "select session_id from sessions where account_id = $1 and ended_at is null",
    )
    .bind(account_id)
    .fetch_all(&mut *conn)
    .await?;
    for s in &sessions {
        end(
            conn,
            account_id,
            *s,
            "signed_out_everywhere",
            metadata.clone(),
        )
        .await?;
    }
    let mut keys = 0;
    if include_keys {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "select key_id from api_keys where account_id = $1 and revoked_at is null",
        )
        .bind(account_id)
        .fetch_all(&mut *conn)
        .await?;
        for k in ids {
            if crate::access::revoke_key(conn, account_id, k, metadata.clone()).await? {
                keys += 1;
            }
        }
    }
    Ok((sessions.len(), keys))
}

#[derive(sqlx::FromRow)]
struct LiveSession {
    session_id: Uuid,
    account_id: Uuid,
    staff: bool,
    mfa_verified: bool,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    last_seen_at: Option<DateTime<Utc>>,
    wrapped: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SessionOwner {
    pub account_id: Uuid,
    pub session_id: Uuid,
    pub staff: bool,
    pub mfa_verified: bool,
    /// The account's data key, read with the session (None: not created
    /// yet, or erased).
    pub data_key: Option<crate::vault::AccountKey>,
}

/// The live session behind a cookie value. An idle one is ended on the spot.
pub async fn authenticate(
    conn: &mut PgConnection,
    token: &str,
    idle: Duration,
    now: DateTime<Utc>,
) -> Result<Option<SessionOwner>, Error> {
    if token.len() != 64 || !token.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let row: Option<LiveSession> = sqlx::query_as(
        "select s.session_id, s.account_id, a.staff, s.mfa_verified, s.created_at, s.expires_at, s.last_seen_at,
                ak.wrapped
           from sessions s join accounts a using (account_id)
                left join account_keys ak using (account_id)
          where s.token_hash = $1 and s.ended_at is null and a.deleted_at is null",
    )
    .bind(hash(token))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(LiveSession {
        session_id,
        account_id,
        staff,
        mfa_verified,
        created_at,
        expires_at,
        last_seen_at,
        wrapped,
    }) = row
    else {
        return Ok(None);
    };
    let last_seen = last_seen_at;
    if now >= expires_at {
        end(conn, account_id, session_id, "expired", Metadata::system()).await?;
        return Ok(None);
    }
    if now - last_seen.unwrap_or(created_at) > idle {
        end(conn, account_id, session_id, "idle", Metadata::system()).await?;
        return Ok(None);
    }
    sqlx::query(
        "update sessions set last_seen_at = $2
          where session_id = $1 and (last_seen_at is null or last_seen_at < $2 - interval '30 seconds')",
    )
    .bind(session_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(Some(SessionOwner {
        account_id,
        session_id,
        staff,
        mfa_verified,
        data_key: wrapped.and_then(|w| crate::vault::AccountKey::unwrap(account_id, &w)),
    }))
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct SessionInfo {
    pub session_id: Uuid,
    pub via: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

pub async fn list(conn: &mut PgConnection, account_id: Uuid) -> Result<Vec<SessionInfo>, Error> {
    Ok(sqlx::query_as(
        "select session_id, via, created_at, expires_at, last_seen_at from sessions
          where account_id = $1 and ended_at is null order by created_at desc",
    )
    .bind(account_id)
    .fetch_all(conn)
    .await?)
}
