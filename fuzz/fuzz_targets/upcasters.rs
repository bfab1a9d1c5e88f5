//! Stored events through the upcasters (events/src/catalog.rs
//! `DomainEvent::decode`): arbitrary type names, schema versions and JSON.
//! Input: `<event type>\n<schema version>\n<payload JSON>` (the corpus has
//! one instance of every schema, from fuzz/seeds/upcasters.py). Never
//! panics; a decoded event is written back in its current version
//! (`payload()`) and reads back as the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slate_events::catalog::DomainEvent;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(3, |b| *b == b'\n');
    let event_type = String::from_utf8_lossy(lines.next().unwrap_or_default());
    let version = std::str::from_utf8(lines.next().unwrap_or_default())
        .ok()
        .and_then(|v| v.trim().parse::<i16>().ok())
        .unwrap_or(1);
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(lines.next().unwrap_or_default())
    else {
        return;
    };
    let Ok(event) = DomainEvent::decode(&event_type, version, payload) else {
        return;
    };
    assert_eq!(event.event_type(), event_type, "decoded as another type");
    let current = event.payload();
    let again = DomainEvent::decode(event.event_type(), event.schema_version(), current.clone())
        .unwrap_or_else(|e| panic!("the current payload does not decode: {e}\n{current}"));
    assert_eq!(again, event, "payload() does not round-trip");
    // And it is stable from there on.
    assert_eq!(again.payload(), current);
});
