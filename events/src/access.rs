//! API keys: `slate_live_<public prefix>_<secret>`. Only the SHA-256 of the
//! whole key and its prefix are stored; the plaintext is shown once.

use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Error;
use crate::catalog::{ApiKeyCreated, ApiKeyRevoked, DomainEvent, Metadata};
use crate::store::{self, ExpectedVersion, NewEvent};

const KEY_PREFIX: &str = "slate_live_";

/// A freshly issued key: the plaintext exists only in this value.
pub struct IssuedKey {
    pub key_id: Uuid,
    pub prefix: String,
    pub plaintext: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("key_id", &self.key_id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn random_hex(bytes: usize) -> String {
    // UUIDv4 draws from the operating system's CSPRNG (122 random bits each).
    let mut out = String::new();
    while out.len() < bytes * 2 {
        out.push_str(&Uuid::new_v4().simple().to_string());
    }
    out.truncate(bytes * 2);
    out
}

fn hash(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Issue a key for an account.
pub async fn create_key(
    conn: &mut PgConnection,
    account_id: Uuid,
    label: Option<&str>,
    metadata: Metadata,
) -> Result<IssuedKey, Error> {
    let key_id = Uuid::now_v7();
    let prefix = random_hex(6);
    // 32 hex chars from each of two UUIDv4s: 244 random bits.
    let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let plaintext = format!("{KEY_PREFIX}{prefix}_{secret}");
    let event = NewEvent::new(
        DomainEvent::ApiKeyCreated(ApiKeyCreated {
            account_id,
            key_id,
            prefix: prefix.clone(),
            secret_hash: hex::encode(hash(&plaintext)),
            label: label.map(str::to_owned),
        }),
        metadata,
    );
    store::append_and_apply(
        conn,
        &format!("api-key-{key_id}"),
        ExpectedVersion::NoStream,
        &event,
    )
    .await?;
    Ok(IssuedKey {
        key_id,
        prefix,
        plaintext,
    })
}

pub async fn revoke_key(
    conn: &mut PgConnection,
    account_id: Uuid,
    key_id: Uuid,
    metadata: Metadata,
) -> Result<bool, Error> {
    let active: bool = sqlx::query_scalar(
        "select exists(select 1 from api_keys where key_id = $1 and account_id = $2 and revoked_at is null)",
    )
    .bind(key_id)
    .bind(account_id)
    .fetch_one(&mut *conn)
    .await?;
    if !active {
        return Ok(false);
    }
    let event = NewEvent::new(
        DomainEvent::ApiKeyRevoked(ApiKeyRevoked { account_id, key_id }),
        metadata,
    );
    store::append_and_apply(
        conn,
        &format!("api-key-{key_id}"),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    Ok(true)
}

/// Who a presented key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOwner {
    pub account_id: Uuid,
    pub key_id: Uuid,
    pub staff: bool,
}

/// Look a presented key up. `None` for anything that is not a live key of a
/// live account; the comparison of hashes is constant-time.
pub async fn authenticate(
    conn: &mut PgConnection,
    presented: &str,
) -> Result<Option<KeyOwner>, Error> {
    let Some(rest) = presented.strip_prefix(KEY_PREFIX) else {
        return Ok(None);
    };
    let Some((prefix, secret)) = rest.split_once('_') else {
        return Ok(None);
    };
    if prefix.len() != 12 || secret.is_empty() || secret.len() > 128 {
        return Ok(None);
    }
    let row: Option<(Uuid, Uuid, Vec<u8>, bool)> = sqlx::query_as(
        "select k.key_id, k.account_id, k.secret_hash, a.staff
           from api_keys k join accounts a using (account_id)
          where k.prefix = $1 and k.revoked_at is null",
    )
    .bind(prefix)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((key_id, account_id, stored, staff)) = row else {
        return Ok(None);
    };
    if !constant_time_eq(&stored, &hash(presented)) {
        return Ok(None);
    }
    // Coarse last-use tracking: at most one write a minute per key.
    sqlx::query(
        "update api_keys set last_used_at = now()
          where key_id = $1 and (last_used_at is null or last_used_at < now() - interval '1 minute')",
    )
    .bind(key_id)
    .execute(&mut *conn)
    .await?;
    Ok(Some(KeyOwner {
        account_id,
        key_id,
        staff,
    }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
