//! `Stripe-Signature` verification, exactly as Stripe signs: the header holds
//! `t=<unix time>` and one or more `v1=<hex HMAC-SHA256>` of `"{t}.{raw body}"`
//! under the endpoint secret. An event is genuine when any `v1` matches any
//! configured secret (two are active while a secret rotates) and `t` is
//! within the tolerance of now, in either direction.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::config::Secret;

/// Stripe's default tolerance.
pub const TOLERANCE_SECS: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    #[error("no signature matches the payload")]
    NoMatch,
    #[error("the signature timestamp is outside the tolerance")]
    OutOfTolerance,
}

impl SignatureError {
    pub fn code(self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::NoMatch => "signature_mismatch",
            SignatureError::OutOfTolerance => "signature_timestamp_out_of_tolerance",
        }
    }
}

/// What a good signature proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub timestamp: i64,
    /// Index of the secret that matched.
    pub secret_index: usize,
}

struct Header {
    timestamp: i64,
    v1: Vec<[u8; 32]>,
}

fn parse(header: &str) -> Result<Header, SignatureError> {
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let (key, value) = item
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::Malformed);
                }
                timestamp = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed)?,
                );
            }
            "v1" => {
                let mut sig = [0u8; 32];
                hex::decode_to_slice(value, &mut sig).map_err(|_| SignatureError::Malformed)?;
                v1.push(sig);
            }
            // Other schemes (v0 test signatures) are ignored, as Stripe's libraries do.
            _ => {}
        }
        if v1.len() > 16 {
            return Err(SignatureError::Malformed);
        }
    }
    match (timestamp, v1.is_empty()) {
        (Some(timestamp), false) => Ok(Header { timestamp, v1 }),
        _ => Err(SignatureError::Malformed),
    }
}

/// A `Stripe-Signature` header value for `body` at `t` under `secret`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Verify `body` against the header and every secret, at time `now`.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[Secret],
    now: i64,
) -> Result<Verified, SignatureError> {
    let header = parse(header.ok_or(SignatureError::Missing)?)?;
    let mut matched = None;
    'secrets: for (i, secret) in secrets.iter().enumerate() {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(header.timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        for candidate in &header.v1 {
            // Constant-time comparison.
            if mac.clone().verify_slice(candidate).is_ok() {
                matched = Some(i);
                break 'secrets;
            }
        }
    }
    let secret_index = matched.ok_or(SignatureError::NoMatch)?;
    // abs_diff: `t` is whatever the header says (fuzzing found `now - t`
    // overflowing for a signed header with an extreme timestamp).
    if now.abs_diff(header.timestamp) > TOLERANCE_SECS.unsigned_abs() {
        return Err(SignatureError::OutOfTolerance);
    }
    Ok(Verified {
        timestamp: header.timestamp,
        secret_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &str) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn parses_and_rejects_headers() {
        let s = [Secret::new("whsec_a")];
        let now = 1_800_000_000;
        let good = sign("whsec_a", now, "{}");
        assert_eq!(verify(None, b"{}", &s, now), Err(SignatureError::Missing));
        for bad in [
            "",
            "t=1",
            "v1=00",
            "t=x,v1=00",
            "t=1,t=2,v1=00",
            "garbage",
            &format!("t={now},v1=zz"),
        ] {
            assert_eq!(
                verify(Some(bad), b"{}", &s, now),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        let h = format!("t={now},v0=abc,v1={good}");
        assert_eq!(verify(Some(&h), b"{}", &s, now).unwrap().secret_index, 0);
    }

    /// Found by fuzz/stripe_signature: a genuinely signed header whose
    /// timestamp is far from now made `now - t` overflow (a panic in debug
    /// builds) instead of answering out of tolerance.
    #[test]
    fn extreme_timestamps_are_out_of_tolerance_not_an_overflow() {
        let s = [Secret::new("")];
        for (t, now) in [
            (
                -8_070_450_463_527_337_984,
                // The fuzzer's input: now = t + skew, wrapped.
                (-8_070_450_463_527_337_984_i64).wrapping_add(-1_945_536_273_238_191_872),
            ),
            (i64::MIN, 1_800_000_000),
            (i64::MAX, -1),
            (i64::MIN, i64::MAX),
        ] {
            let h = format!("t={t},v1={}", sign("", t, ""));
            assert_eq!(
                verify(Some(&h), b"", &s, now),
                Err(SignatureError::OutOfTolerance),
                "{t} at {now}"
            );
        }
        let h = format!("t={},v1={}", i64::MIN, sign("", i64::MIN, ""));
        assert!(verify(Some(&h), b"", &s, i64::MIN + 300).is_ok());
    }
}
