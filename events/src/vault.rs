//! Personal fields (emails, prompts) sealed with a per-account data key, so
//! that erasing one key makes every copy unreadable (crypto-shredding) while
//! the log stays append-only.
//!
//! A sealed value is a string `sealed:v1:<account id>:<base64 nonce+ciphertext>`
//! (AES-256-GCM, bound to the account id). The data keys live in
//! `account_keys`, each wrapped with the server key (`SLATE_SECRET_KEY`), so
//! a dump of the database alone opens nothing. Values written before sealing
//! existed (plain strings) read as themselves.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::Error;
use crate::mfa::SealingKey;

const PREFIX: &str = "sealed:v1:";

/// What staff tools and exports show where a purged account's field was.
pub const ERASED: &str = "[erased]";

static SERVER_KEY: OnceLock<SealingKey> = OnceLock::new();

/// Use `key` to wrap data keys in this process (call once, at start-up,
/// before anything is sealed). Without it the development key is used.
pub fn install(key: SealingKey) {
    let _ = SERVER_KEY.set(key);
}

fn server_key() -> &'static SealingKey {
    SERVER_KEY.get_or_init(SealingKey::development)
}

/// A personal field, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    Plain(String),
    /// The account's key was erased (or the value does not open with it).
    Erased,
}

impl Opened {
    pub fn into_option(self) -> Option<String> {
        match self {
            Opened::Plain(s) => Some(s),
            Opened::Erased => None,
        }
    }

    /// The plaintext, or [`ERASED`].
    pub fn or_erased(self) -> String {
        self.into_option().unwrap_or_else(|| ERASED.to_owned())
    }
}

pub fn is_sealed(value: &str) -> bool {
    value.starts_with(PREFIX)
}

/// Seal `plaintext` with the account's data key, creating the key on first
/// use. Fails for an account whose key was erased.
pub async fn seal(
    conn: &mut PgConnection,
    account_id: Uuid,
    plaintext: &str,
) -> Result<String, Error> {
    Ok(AccountKey::get_or_create(conn, account_id)
        .await?
        .ok_or_else(|| Error::InvalidArgument(format!("account {account_id} is erased")))?
        .seal(plaintext))
}

/// One account's data key, opened, to seal several values without a round
/// trip each (what a request records of its origin).
#[derive(Clone)]
pub struct AccountKey {
    account_id: Uuid,
    key: SealingKey,
}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountKey")
            .field("account_id", &self.account_id)
            .finish_non_exhaustive()
    }
}

impl AccountKey {
    /// The key from its wrapped form, as `account_keys` stores it (read
    /// together with something else); None if it does not open.
    pub fn unwrap(account_id: Uuid, wrapped: &str) -> Option<Self> {
        unwrap_key(account_id, wrapped).map(|key| Self { account_id, key })
    }

    /// The account's key, created on first use; None once it was erased.
    pub async fn get_or_create(
        conn: &mut PgConnection,
        account_id: Uuid,
    ) -> Result<Option<Self>, Error> {
        // One round trip: the stored key, or this fresh one on first use.
        let fresh = server_key().seal_bound(&random_key(), account_id.as_bytes());
        let wrapped: Option<Option<String>> = sqlx::query_scalar(
            "with ins as (insert into account_keys (account_id, wrapped) values ($1, $2)
                          on conflict (account_id) do nothing returning wrapped)
             select wrapped from ins union all
             select wrapped from account_keys where account_id = $1 limit 1",
        )
        .bind(account_id)
        .bind(&fresh)
        .fetch_optional(&mut *conn)
        .await?;
        // No row: a concurrent first use inserted it after our snapshot; read it.
        let key = match wrapped {
            Some(w) => w.and_then(|w| unwrap_key(account_id, &w)),
            None => Keyring::default().key(conn, account_id).await?,
        };
        Ok(key.map(|key| Self { account_id, key }))
    }

    /// `known` (read with something else), or else the account's key read
    /// or created now; None once it was erased.
    pub async fn known_or_create(
        conn: &mut PgConnection,
        account_id: Uuid,
        known: Option<Self>,
    ) -> Result<Option<Self>, Error> {
        match known {
            Some(k) => Ok(Some(k)),
            None => Self::get_or_create(conn, account_id).await,
        }
    }

    pub fn seal(&self, plaintext: &str) -> String {
        format!(
            "{PREFIX}{}:{}",
            self.account_id,
            self.key
                .seal_bound(plaintext.as_bytes(), self.account_id.as_bytes())
        )
    }
}

/// Open one value (see [`Keyring`] to open many).
pub async fn open(conn: &mut PgConnection, value: &str) -> Result<Opened, Error> {
    Keyring::default().open(conn, value).await
}

/// Erase the account's data key: every value sealed with it stays in the
/// log and in backups, unreadable. Idempotent.
pub async fn erase(conn: &mut PgConnection, account_id: Uuid) -> Result<(), Error> {
    sqlx::query(
        "insert into account_keys (account_id, wrapped, erased_at) values ($1, null, now())
         on conflict (account_id) do update
            set wrapped = null, erased_at = coalesce(account_keys.erased_at, now())",
    )
    .bind(account_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Data keys fetched for one unit of work (a request, an export, a replay).
#[derive(Default)]
pub struct Keyring {
    keys: HashMap<Uuid, Option<SealingKey>>,
    /// Open only this account's values ([`Keyring::only`]).
    only: Option<Uuid>,
    /// The accounts whose values were opened since [`Keyring::take_opened`].
    opened: BTreeSet<Uuid>,
}

impl Keyring {
    /// A keyring that opens `account_id`'s values only: what is shown to
    /// that account. A value sealed by another account reads as erased: a
    /// string the account wrote itself (a request id, a prompt) could be
    /// someone else's ciphertext, copied from a dump, for this service to
    /// open.
    pub fn only(account_id: Uuid) -> Self {
        Self {
            keys: HashMap::new(),
            only: Some(account_id),
            opened: BTreeSet::new(),
        }
    }

    /// A keyring that already holds one account's data key, in the wrapped
    /// form `account_keys` stores (None: erased or never created), read
    /// together with the values it opens.
    pub fn with_wrapped(account_id: Uuid, wrapped: Option<&str>) -> Self {
        let key = wrapped.and_then(|w| unwrap_key(account_id, w));
        Self {
            keys: HashMap::from([(account_id, key)]),
            only: None,
            opened: BTreeSet::new(),
        }
    }

    async fn key(
        &mut self,
        conn: &mut PgConnection,
        account_id: Uuid,
    ) -> Result<Option<SealingKey>, Error> {
        if let Some(k) = self.keys.get(&account_id) {
            return Ok(k.clone());
        }
        let wrapped: Option<Option<String>> =
            sqlx::query_scalar("select wrapped from account_keys where account_id = $1")
                .bind(account_id)
                .fetch_optional(conn)
                .await?;
        let key = wrapped.flatten().and_then(|w| unwrap_key(account_id, &w));
        self.keys.insert(account_id, key.clone());
        Ok(key)
    }

    /// Fetch in one round trip the keys of the accounts that sealed any of
    /// `values` (those not fetched yet), to open a page of them.
    pub async fn fetch_for<'a>(
        &mut self,
        conn: &mut PgConnection,
        values: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), Error> {
        let mut wanted: Vec<Uuid> = values
            .into_iter()
            .filter_map(|v| sealed_by(v).map(|(account_id, _)| account_id))
            .filter(|a| !self.keys.contains_key(a))
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return Ok(());
        }
        let rows: Vec<(Uuid, Option<String>)> = sqlx::query_as(
            "select account_id, wrapped from account_keys where account_id = any($1)",
        )
        .bind(&wanted)
        .fetch_all(conn)
        .await?;
        for account_id in wanted {
            self.keys.insert(account_id, None);
        }
        for (account_id, wrapped) in rows {
            let key = wrapped.and_then(|w| unwrap_key(account_id, &w));
            self.keys.insert(account_id, key);
        }
        Ok(())
    }

    /// Open a value: sealed ones with their account's key, plain ones as
    /// they are.
    pub async fn open(&mut self, conn: &mut PgConnection, value: &str) -> Result<Opened, Error> {
        if !is_sealed(value) {
            return Ok(Opened::Plain(value.to_owned()));
        }
        let Some((account_id, body)) = sealed_by(value) else {
            return Ok(Opened::Erased);
        };
        if self.only.is_some_and(|only| only != account_id) {
            return Ok(Opened::Erased);
        }
        let Some(key) = self.key(conn, account_id).await? else {
            return Ok(Opened::Erased);
        };
        let opened = key
            .open_bound(body, account_id.as_bytes())
            .and_then(|b| String::from_utf8(b).ok())
            .map_or(Opened::Erased, Opened::Plain);
        if matches!(opened, Opened::Plain(_)) {
            self.opened.insert(account_id);
        }
        Ok(opened)
    }

    /// The accounts whose sealed values this keyring opened since it was
    /// last asked (a staff read of them is recorded against each).
    pub fn take_opened(&mut self) -> BTreeSet<Uuid> {
        std::mem::take(&mut self.opened)
    }

    /// Replace every sealed string inside `value` (an event payload, say)
    /// with its plaintext, or [`ERASED`].
    pub async fn reveal(
        &mut self,
        conn: &mut PgConnection,
        value: &mut serde_json::Value,
    ) -> Result<(), Error> {
        let mut stack = vec![value];
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::String(s) if is_sealed(s) => {
                    *s = self.open(conn, s).await?.or_erased();
                }
                serde_json::Value::Array(items) => stack.extend(items.iter_mut()),
                serde_json::Value::Object(map) => stack.extend(map.values_mut()),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The account that sealed `value`, and the sealed body, if it is a
/// well-formed sealed value.
fn sealed_by(value: &str) -> Option<(Uuid, &str)> {
    let (account, body) = value.strip_prefix(PREFIX)?.split_once(':')?;
    Some((account.parse().ok()?, body))
}

/// A data key from its wrapped form (None if it does not open).
fn unwrap_key(account_id: Uuid, wrapped: &str) -> Option<SealingKey> {
    server_key()
        .open_bound(wrapped, account_id.as_bytes())
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .map(SealingKey::new)
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key).expect("the system random source works");
    key
}
