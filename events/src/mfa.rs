//! The second factor for staff: TOTP (RFC 6238: HMAC-SHA1, 30-second steps,
//! 6 digits, one step of drift either way, each code accepted once). The
//! secret is sealed with the server key (AES-256-GCM) before it is stored.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Error;
use crate::catalog::{DomainEvent, Metadata, SessionMfaVerified, TotpEnrolled};
use crate::store::{self, ExpectedVersion, NewEvent};

const STEP: i64 = 30;

/// The server key that seals stored secrets.
#[derive(Clone)]
pub struct SealingKey([u8; 32]);

impl SealingKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn key(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key"))
    }

    /// The fixed key of local development and tests (`SLATE_SECRET_KEY` unset).
    pub fn development() -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(b"slate local development sealing key");
        let mut key = [0u8; 32];
        key.copy_from_slice(&digest);
        Self(key)
    }

    pub fn seal(&self, plaintext: &[u8]) -> String {
        self.seal_bound(plaintext, &[])
    }

    pub fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        self.open_bound(sealed, &[])
    }

    /// Seal, binding the ciphertext to `context` (authenticated, not stored):
    /// it opens only with the same context.
    pub fn seal_bound(&self, plaintext: &[u8], context: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&Uuid::new_v4().as_bytes()[..NONCE_LEN]);
        let mut buf = plaintext.to_vec();
        self.key()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut buf,
            )
            .expect("sealing cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        B64.encode(out)
    }

    pub fn open_bound(&self, sealed: &str, context: &[u8]) -> Option<Vec<u8>> {
        let raw = B64.decode(sealed).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let mut buf = body.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self
            .key()
            .open_in_place(nonce, Aad::from(context), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(…)")
    }
}

/// RFC 4648 base32 without padding (what authenticator apps read).
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The 6-digit code of a secret at a step.
pub fn code_at(secret: &[u8], step: i64) -> String {
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(secret).expect("any key length");
    mac.update(&step.to_be_bytes());
    let h = mac.finalize().into_bytes();
    let offset = (h[h.len() - 1] & 0x0f) as usize;
    let bin = (u32::from(h[offset] & 0x7f) << 24)
        | (u32::from(h[offset + 1]) << 16)
        | (u32::from(h[offset + 2]) << 8)
        | u32::from(h[offset + 3]);
    format!("{:06}", bin % 1_000_000)
}

/// Set up (or replace) an account's second factor. Returns the otpauth URI
/// to show once (it carries the secret).
pub async fn enroll(
    conn: &mut PgConnection,
    account_id: Uuid,
    label: &str,
    key: &SealingKey,
    metadata: Metadata,
) -> Result<String, Error> {
    let mut secret = Vec::with_capacity(20);
    secret.extend_from_slice(Uuid::new_v4().as_bytes());
    secret.extend_from_slice(&Uuid::new_v4().as_bytes()[..4]);
    sqlx::query(
        "insert into totp_secrets (account_id, sealed) values ($1, $2)
         on conflict (account_id) do update set sealed = excluded.sealed, last_step = 0, created_at = now()",
    )
    .bind(account_id)
    .bind(key.seal(&secret))
    .execute(&mut *conn)
    .await?;
    let event = NewEvent::new(
        DomainEvent::TotpEnrolled(TotpEnrolled { account_id }),
        metadata,
    );
    store::append(
        conn,
        &format!("mfa-{account_id}"),
        ExpectedVersion::Any,
        &[event],
    )
    .await?;
    Ok(format!(
        "otpauth://totp/Slate:{label}?secret={}&issuer=Slate&algorithm=SHA1&digits=6&period=30",
        base32(&secret)
    ))
}

/// Check a code (once per step, ±1 step) and mark the session verified.
pub async fn verify_session(
    conn: &mut PgConnection,
    account_id: Uuid,
    session_id: Uuid,
    code: &str,
    key: &SealingKey,
    now: DateTime<Utc>,
) -> Result<bool, Error> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "select sealed, last_step from totp_secrets where account_id = $1 for update",
    )
    .bind(account_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((sealed, last_step)) = row else {
        return Ok(false);
    };
    let Some(secret) = key.open(&sealed) else {
        return Ok(false);
    };
    let current = now.timestamp().div_euclid(STEP);
    let code = code.trim();
    let matched = (current - 1..=current + 1)
        .filter(|s| *s > last_step)
        .find(|s| {
            crate::access::constant_time_eq(code_at(&secret, *s).as_bytes(), code.as_bytes())
        });
    let Some(step) = matched else {
        return Ok(false);
    };
    sqlx::query("update totp_secrets set last_step = $2 where account_id = $1")
        .bind(account_id)
        .bind(step)
        .execute(&mut *conn)
        .await?;
    let event = NewEvent::new(
        DomainEvent::SessionMfaVerified(SessionMfaVerified {
            account_id,
            session_id,
        }),
        Metadata::by(crate::Actor::User { account_id }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_test_vector_and_sealing() {
        // RFC 6238 appendix B, SHA1, T = 59 s -> 94287082 (8 digits); 6 digits: 287082.
        assert_eq!(code_at(b"12345678901234567890", 59 / 30), "287082");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        let k = SealingKey::new([7; 32]);
        let sealed = k.seal(b"secret");
        assert_eq!(k.open(&sealed).unwrap(), b"secret");
        assert!(SealingKey::new([8; 32]).open(&sealed).is_none());
    }
}
