//! The OpenAPI document: checked in up to date, and served.

use crate::http::spawn_app;

#[test]
fn openapi_checked_in_document_is_up_to_date() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == slate::http::openapi::pretty(),
        "docs/openapi.json is stale: run `cargo run -- openapi` and commit it"
    );
}

#[tokio::test]
async fn openapi_json_is_served_and_matches_the_checked_in_document() {
    let app = spawn_app().await;
    let (status, body, headers) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert!(body["openapi"].as_str().unwrap().starts_with("3.1."));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let checked_in: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(body, checked_in);
    // Needs no credential, and documents the routes a client uses.
    for path in ["/v1/generations", "/webhooks/stripe", "/v1/auth/oidc/start"] {
        assert!(
            body["paths"].get(path).is_some(),
            "{path} is not documented"
        );
    }
}
