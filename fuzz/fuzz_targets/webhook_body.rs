//! What `POST /webhooks/stripe` does with a body once its signature is
//! verified (src/stripe/webhook.rs), and what processing then reads from the
//! mirrored event (events/src/stripe.rs): UTF-8, async-stripe's typed parse,
//! the envelope fields kept in the mirror, and the per-type fields and sums.
//! Any bytes: no panic, and a mirrored event is what it claims.
#![no_main]

use std::collections::HashMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use slate::stripe::webhook::typed_parse_error;
use slate_events::stripe::{IncomingEvent, StripeCatalog, read_mirrored};

/// The catalog the fixtures are written for (tests/fixtures/stripe).
static CATALOG: LazyLock<StripeCatalog> = LazyLock::new(|| StripeCatalog {
    packs: HashMap::from([("price_starter".to_owned(), 500)]),
    plans: HashMap::from([("price_pro_monthly".to_owned(), 1000)]),
});

fuzz_target!(|data: &[u8]| {
    // Not UTF-8: refused as body_unparseable before anything else.
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let parse_error = typed_parse_error(raw);
    let Some(event) = IncomingEvent::from_raw(raw, parse_error.clone()) else {
        return;
    };
    assert!(event.stripe_event_id.starts_with("evt_"));
    assert_eq!(event.raw, raw, "the mirror keeps the exact bytes");
    assert_eq!(event.parse_error, parse_error);
    // from_raw reads the envelope without a JSON tree and skips the rest, and
    // skipping a number does not check that it fits an f64 (`1e999` in a
    // field nobody reads). Such a body is still what it claims (its envelope
    // fields were read); only the tree to compare them with cannot be built.
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(v) => {
            assert_eq!(v["type"].as_str(), Some(event.event_type.as_str()));
            assert_eq!(v["livemode"].as_bool(), Some(event.livemode));
            assert_eq!(v["created"].as_i64(), Some(event.created.timestamp()));
        }
        Err(e) => assert!(
            e.to_string().starts_with("number out of range"),
            "from_raw accepted a body serde_json refuses: {e}"
        ),
    }
    // Processing reads the mirrored body by its type; it may refuse it
    // (a permanent or retryable error), never panic.
    let _ = read_mirrored(&event.raw, &event.event_type, &CATALOG);
});
