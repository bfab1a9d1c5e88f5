//! `Stripe-Signature` parsing and verification (src/stripe/signature.rs).
//!
//! Arbitrary headers, bodies, secrets and clocks: `verify` never panics, and
//! whatever it accepts is checked against an HMAC-SHA256 computed here with
//! another implementation (aws-lc-rs). Headers are either taken as given or
//! assembled from parts, some of them genuine signatures, so the accepting
//! paths are reached too.
#![no_main]

use arbitrary::Arbitrary;
use aws_lc_rs::hmac;
use libfuzzer_sys::fuzz_target;
use slate::config::Secret;
use slate::stripe::signature::{self, SignatureError, TOLERANCE_SECS};

#[derive(Debug, Arbitrary)]
enum Part {
    /// `v1=` + the genuine signature under secret `n % secrets.len()`.
    Genuine(u8),
    /// An item as given (garbage, `v0=…`, spaces, an empty item…).
    Raw(String),
    /// `v1=` + these bytes in hex (right length, wrong value).
    Hex([u8; 32]),
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// Used as the whole header when `parts` is empty.
    header: String,
    parts: Vec<Part>,
    t: i64,
    /// Seconds between `t` and the verifier's clock.
    skew: i64,
    secrets: Vec<String>,
    body: Vec<u8>,
}

fn mac(secret: &str, t: i64, body: &[u8]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    ctx.sign().as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The header as the spec reads it: comma-separated `key=value` items, one
/// `t`, `v1` items in hex. `None` when it is not well formed.
fn oracle_parse(header: &str) -> Option<(i64, Vec<Vec<u8>>)> {
    let mut t = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let (k, v) = item.trim().split_once('=')?;
        match k {
            "t" if t.is_none() => t = Some(v.parse::<i64>().ok()?),
            "t" => return None,
            "v1" => v1.push(hex::decode(v).ok().filter(|s| s.len() == 32)?),
            _ => {}
        }
    }
    Some((t?, v1))
}

fuzz_target!(|input: Input| {
    let Input {
        header,
        parts,
        t,
        skew,
        secrets,
        body,
    } = input;
    // Wraps at the ends of i64: then the clock is far from `t`.
    let now = t.wrapping_add(skew);
    let header = if parts.is_empty() {
        header
    } else {
        let mut items = vec![format!("t={t}")];
        for p in &parts {
            items.push(match p {
                Part::Genuine(n) if !secrets.is_empty() => {
                    let s = &secrets[usize::from(*n) % secrets.len()];
                    format!("v1={}", hex::encode(mac(s, t, &body)))
                }
                Part::Genuine(_) => "v1=".into(),
                Part::Raw(s) => s.clone(),
                Part::Hex(b) => format!("v1={}", hex::encode(b)),
            });
        }
        items.join(",")
    };
    let keys: Vec<Secret> = secrets.iter().map(Secret::new).collect();

    let result = signature::verify(Some(&header), &body, &keys, now);
    match &result {
        Ok(v) => {
            // Accepted: the header is well formed, the time within the
            // tolerance, and secret `secret_index` really signed it.
            let (ht, v1) = oracle_parse(&header).expect("accepted a malformed header");
            assert_eq!(v.timestamp, ht);
            assert!(
                now.abs_diff(ht) <= TOLERANCE_SECS as u64,
                "accepted {ht} at {now}"
            );
            let expected = mac(&secrets[v.secret_index], ht, &body);
            assert!(
                v1.iter().any(|s| s[..] == expected[..]),
                "accepted a wrong MAC"
            );
            // And it is the first secret that signed it.
            for earlier in &secrets[..v.secret_index] {
                let m = mac(earlier, ht, &body);
                assert!(!v1.iter().any(|s| s[..] == m[..]));
            }
        }
        Err(SignatureError::Missing) => panic!("a header was given"),
        Err(e) => {
            // Stable codes only.
            assert!(e.code().starts_with("signature_"));
        }
    }
    // A header assembled with a genuine signature, nothing malformed, and a
    // clock within the tolerance must pass.
    let well_formed = parts.iter().all(|p| match p {
        Part::Raw(s) => {
            let s = s.trim();
            s.split_once('=')
                .is_some_and(|(k, _)| k != "t" && k != "v1")
                && !s.contains(',')
        }
        Part::Genuine(_) => !secrets.is_empty(),
        Part::Hex(_) => true,
    });
    let genuine = parts.iter().any(|p| matches!(p, Part::Genuine(_)));
    if genuine
        && well_formed
        && now.abs_diff(t) <= TOLERANCE_SECS as u64
        && parts.iter().filter(|p| !matches!(p, Part::Raw(_))).count() <= 16
    {
        assert!(result.is_ok(), "refused a genuine signature: {result:?}");
    }

    // What `sign` produces verifies, at the same instant.
    if let Some(s) = secrets.first() {
        let h = signature::sign(s, t, &body);
        let v = signature::verify(Some(&h), &body, &keys[..1], t).expect("own signature");
        assert_eq!(v.timestamp, t);
    }
    // No header at all.
    assert_eq!(
        signature::verify(None, &body, &keys, now),
        Err(SignatureError::Missing)
    );
});
