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
    // 32 hex chars from each of two UUIDv4s: 244 random bits, then a
    // checksum so a secret scanner can recognise a key offline.
    let secret = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
    let body = format!("{KEY_PREFIX}{prefix}_{secret}");
    let plaintext = format!("{body}{:08x}", crc32(body.as_bytes()));
    // The owner's free text: sealed, so that a purge erases it.
    let label = match label {
        Some(l) => Some(crate::vault::seal(conn, account_id, l).await?),
        None => None,
    };
    let event = NewEvent::new(
        DomainEvent::ApiKeyCreated(ApiKeyCreated {
            account_id,
            key_id,
            prefix: prefix.clone(),
            secret_hash: hex::encode(hash(&plaintext)),
            label,
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
#[derive(Debug, Clone)]
pub struct KeyOwner {
    pub account_id: Uuid,
    pub key_id: Uuid,
    pub staff: bool,
    /// The account's data key, read with the key (None: not created yet,
    /// or erased).
    pub data_key: Option<crate::vault::AccountKey>,
}

/// A presented key, looked up ([`authenticate`]).
#[derive(Debug)]
pub enum Presented {
    /// A live key of a live account.
    Owner(KeyOwner),
    /// Anything else, with what its record may say.
    Refused(Refusal),
}

impl Presented {
    pub fn owner(self) -> Option<KeyOwner> {
        match self {
            Presented::Owner(o) => Some(o),
            Presented::Refused(_) => None,
        }
    }
}

/// What the record of a refused key says of it and of where it came from.
/// The owner's own key (on file and matching, but revoked, or its account
/// deleted) is named by its prefix, and the client's address is sealed
/// with its account's data key, so that the account's purge erases it
/// (left out once that key is erased). A key on file presented with
/// another secret is named, and the address kept as it is: whoever tried
/// it is not shown to be the account. A key not on file is not named: it
/// may be a purged account's, which the log's `ApiKeyCreated` would tie
/// the address to.
#[derive(Debug, Default)]
pub struct Refusal {
    /// The key's prefix, when the key is on file.
    pub key_prefix: Option<String>,
    /// The account and its data key as read, when the key is the owner's.
    owner: Option<(Uuid, Option<crate::vault::AccountKey>)>,
}

impl Refusal {
    /// The client's address `ip` as the record keeps it. Where the owner's
    /// key cannot be read (the database failing) it is left out.
    pub async fn address(&self, conn: &mut PgConnection, ip: Option<String>) -> Option<String> {
        let Some((account_id, known)) = &self.owner else {
            return ip;
        };
        match crate::vault::AccountKey::known_or_create(conn, *account_id, known.clone()).await {
            Ok(key) => Some(key?.seal(&ip?)),
            Err(e) => {
                tracing::warn!(error = %e, "could not read a refused key's account key");
                None
            }
        }
    }
}

/// Look a presented key up: its owner for a live key of a live account,
/// or what the refusal's record may say ([`Refusal`]). One statement for
/// either; the comparison of hashes is constant-time.
pub async fn authenticate(conn: &mut PgConnection, presented: &str) -> Result<Presented, Error> {
    // A malformed key is still named when its prefix is on file (a
    // mistyped key, say).
    let Some(prefix) = public_prefix(presented) else {
        return Ok(Presented::Refused(Refusal::default()));
    };
    #[derive(sqlx::FromRow)]
    struct Row {
        key_id: Uuid,
        account_id: Uuid,
        secret_hash: Vec<u8>,
        staff: bool,
        live: bool,
        wrapped: Option<String>,
        used_lately: bool,
    }
    let row: Option<Row> = sqlx::query_as(
        "select k.key_id, k.account_id, k.secret_hash, a.staff,
                k.revoked_at is null and a.deleted_at is null as live, ak.wrapped,
                coalesce(k.last_used_at >= now() - interval '1 minute', false) as used_lately
           from api_keys k join accounts a using (account_id)
                left join account_keys ak using (account_id)
          where k.prefix = $1",
    )
    .bind(prefix)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(Presented::Refused(Refusal::default()));
    };
    let named = Some(prefix.to_owned());
    // Only the key itself hashes to the stored hash (a malformed one never).
    if !constant_time_eq(&row.secret_hash, &hash(presented)) {
        return Ok(Presented::Refused(Refusal {
            key_prefix: named,
            owner: None,
        }));
    }
    let data_key = row
        .wrapped
        .and_then(|w| crate::vault::AccountKey::unwrap(row.account_id, &w));
    if !row.live {
        return Ok(Presented::Refused(Refusal {
            key_prefix: named,
            owner: Some((row.account_id, data_key)),
        }));
    }
    // Coarse last-use tracking: at most one write a minute per key, and no
    // statement at all when the read above saw a use within the minute (the
    // update's own condition settles concurrent requests).
    if !row.used_lately {
        sqlx::query(
            "update api_keys set last_used_at = now()
              where key_id = $1 and (last_used_at is null or last_used_at < now() - interval '1 minute')",
        )
        .bind(row.key_id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(Presented::Owner(KeyOwner {
        account_id: row.account_id,
        key_id: row.key_id,
        staff: row.staff,
        data_key,
    }))
}

/// CRC-32 (IEEE), the checksum at the end of every key.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Does this look like a Slate key, checksum included? (No database needed:
/// secret scanners can run this offline.)
pub fn has_valid_checksum(key: &str) -> bool {
    if !key.starts_with(KEY_PREFIX) || key.len() < KEY_PREFIX.len() + 8 || !key.is_ascii() {
        return false;
    }
    let (body, sum) = key.split_at(key.len() - 8);
    u32::from_str_radix(sum, 16).is_ok_and(|s| s == crc32(body.as_bytes()))
}

/// The public prefix of a presented credential, for logs and events (never
/// the secret).
pub fn public_prefix(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(KEY_PREFIX)?;
    let (prefix, _) = rest.split_once('_')?;
    (prefix.len() == 12 && prefix.chars().all(|c| c.is_ascii_hexdigit())).then_some(prefix)
}

/// An account's keys, newest first (prefix and label; never a secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct KeyInfo {
    pub key_id: Uuid,
    pub prefix: String,
    pub label: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub last_used_at: Option<chrono::DateTime<chrono::Utc>>,
    pub revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The labels opened (sealed with the account's key since 2026-12-06;
/// older ones are plain).
pub async fn list_keys(conn: &mut PgConnection, account_id: Uuid) -> Result<Vec<KeyInfo>, Error> {
    let mut keys: Vec<KeyInfo> = sqlx::query_as(
        "select key_id, prefix, label, created_at, last_used_at, revoked_at from api_keys
          where account_id = $1 order by created_at desc",
    )
    .bind(account_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut keyring = crate::vault::Keyring::only(account_id);
    for key in &mut keys {
        if let Some(label) = &mut key.label {
            *label = keyring.open(conn, label).await?.or_erased();
        }
    }
    Ok(keys)
}

/// A presented credential was refused (recorded without the secret).
pub async fn record_auth_failure(
    appends: &store::GroupCommit,
    reason: &str,
    key_prefix: Option<&str>,
    ip: Option<&str>,
    route: &str,
) -> Result<(), Error> {
    let event = NewEvent::new(
        DomainEvent::AuthenticationFailed(crate::catalog::AuthenticationFailed {
            reason: reason.to_owned(),
            key_prefix: key_prefix.map(str::to_owned),
            ip: ip.map(str::to_owned),
            route: route.to_owned(),
        }),
        Metadata::system(),
    );
    appends
        .append(
            &format!("auth-failure-{}", event.event_id),
            ExpectedVersion::NoStream,
            vec![event],
        )
        .await?;
    Ok(())
}

/// An authenticated account was refused a route (a non-staff account on a
/// staff route).
pub async fn record_access_denied(
    appends: &store::GroupCommit,
    account_id: Uuid,
    route: &str,
) -> Result<(), Error> {
    let event = NewEvent::new(
        DomainEvent::AccessDenied(crate::catalog::AccessDenied {
            account_id,
            route: route.to_owned(),
        }),
        Metadata::by(crate::Actor::User { account_id }),
    );
    appends
        .append(
            &format!("access-denied-{}", event.event_id),
            ExpectedVersion::NoStream,
            vec![event],
        )
        .await?;
    Ok(())
}

/// A staff member read an account's data (staff reads are audited), by
/// the request `request` describes (its id, key, and sealed address and
/// user agent: a search by request id finds what a request read).
/// Standalone appends like these are committed in groups
/// ([`store::GroupCommit`]): a flood of refused credentials shares commits.
pub async fn record_staff_read(
    appends: &store::GroupCommit,
    staff_id: Uuid,
    account_id: Uuid,
    what: &str,
    request: &Metadata,
) -> Result<(), Error> {
    let event = NewEvent::new(
        DomainEvent::StaffRead(crate::catalog::StaffRead {
            staff_id,
            account_id,
            what: what.to_owned(),
        }),
        Metadata {
            actor: crate::Actor::Staff {
                account_id: staff_id,
            },
            ..request.clone()
        },
    );
    appends
        .append(
            &format!("staff-read-{}", event.event_id),
            ExpectedVersion::NoStream,
            vec![event],
        )
        .await?;
    Ok(())
}

/// Equality of secrets (key hashes, TOTP codes) in time that does not depend
/// on where they differ (aws-lc's `CRYPTO_memcmp`).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

#[cfg(test)]
mod constant_time_tests {
    #[test]
    fn equal_and_unequal_secrets() {
        use super::constant_time_eq as eq;
        assert!(eq(b"slate", b"slate"));
        assert!(!eq(b"slate", b"slatf"));
        assert!(!eq(b"slate", b"slat"));
        assert!(eq(b"", b""));
    }
}
