//! The catalog's upcasting path, through the real log.

use serde_json::json;
use slate_events::catalog::{AccountCreated, DomainEvent};
use slate_events::projections::{self, Projection};
use uuid::Uuid;

use crate::harness::TestDb;

#[test]
fn an_account_created_v1_payload_is_upcast_to_v2() {
    let id = Uuid::now_v7();
    let event = DomainEvent::decode(
        "AccountCreated",
        1,
        json!({"account_id": id, "email": "a@example.com"}),
    )
    .unwrap();
    assert_eq!(
        event,
        DomainEvent::AccountCreated(AccountCreated {
            account_id: id,
            email: "a@example.com".into(),
            staff: false
        })
    );
    assert_eq!(event.schema_version(), 2);
    // Unknown shapes are refused, not guessed.
    assert!(DomainEvent::decode("AccountCreated", 1, json!({"email": "a@example.com"})).is_err());
    assert!(DomainEvent::decode("AccountCreated", 9, json!({})).is_err());
    assert!(DomainEvent::decode("NoSuchEvent", 1, json!({})).is_err());
}

#[tokio::test]
async fn a_v1_event_stored_in_the_log_is_read_in_its_current_shape_on_rebuild() {
    let db = TestDb::new().await;
    let id = Uuid::now_v7();
    // Written by an older release.
    sqlx::query(
        "insert into events (event_id, stream_id, stream_version, event_type, schema_version, payload)
         values ($1, $2, 1, 'AccountCreated', 1, $3)",
    )
    .bind(Uuid::now_v7())
    .bind(format!("account-{id}"))
    .bind(json!({"account_id": id, "email": "old@example.com"}))
    .execute(&db.pool)
    .await
    .unwrap();
    projections::rebuild(&db.pool, Projection::Credits)
        .await
        .unwrap();
    let staff: bool = sqlx::query_scalar("select staff from accounts where account_id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(!staff);
    assert!(
        projections::verify(&db.pool, Projection::ALL)
            .await
            .unwrap()
            .is_clean()
    );
}

#[test]
fn the_checked_in_json_schema_files_are_up_to_date() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("events/schema");
    let mut stale = Vec::new();
    for f in slate_events::catalog::schema_files() {
        let on_disk = std::fs::read_to_string(dir.join(&f.file_name)).unwrap_or_default();
        if on_disk != f.contents {
            stale.push(f.file_name);
        }
    }
    assert!(
        stale.is_empty(),
        "stale event schema files {stale:?}: run `cargo run -- events schema` and commit events/schema/"
    );
    // And no file is left over from an event that no longer exists.
    let expected: Vec<String> = slate_events::catalog::schema_files()
        .into_iter()
        .map(|f| f.file_name)
        .collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(expected.contains(&name), "unexpected schema file {name}");
    }
}

#[test]
fn every_event_type_is_audited() {
    for f in slate_events::catalog::schema_files() {
        let Some(name) = f.file_name.split(".v").next() else {
            continue;
        };
        if f.file_name == "Metadata.schema.json" || !f.contents.contains("\"x-current\": true") {
            continue;
        }
        assert!(
            slate_events::projections::audit::EVENT_TYPES.contains(&name),
            "{name} is not in the audit log's event types"
        );
    }
}
