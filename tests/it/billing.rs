//! Buying credits through Stripe Checkout (the Stripe API faked with
//! wiremock, called through async-stripe), API keys, and the credit routes.

use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::credits::new_account;
use crate::http::{TestApp, spawn_app_with};
use crate::stripe::fixture;

async fn billing_app(stripe: &MockServer) -> TestApp {
    spawn_app_with(&[
        ("STRIPE_API_KEY", "sk_test_fake_0000"),
        ("STRIPE_API_BASE", &format!("{}/", stripe.uri())),
        ("STRIPE_PACKS", "price_starter=500"),
        ("STRIPE_PLANS", "price_pro_monthly=1000"),
        ("SLATE_PUBLIC_URL", "https://app.slate.test"),
    ])
    .await
}

/// A checkout session as the Stripe API returns it on creation.
pub fn session_response(account: uuid::Uuid, mode: &str) -> Value {
    let event: Value = serde_json::from_str(&fixture(
        "01_checkout_session_completed_pack",
        account,
        "api",
    ))
    .unwrap();
    let mut s = event["data"]["object"].clone();
    s["id"] = "cs_test_created_1".into();
    s["url"] = "https://checkout.stripe.com/c/pay/cs_test_created_1".into();
    s["status"] = "open".into();
    s["payment_status"] = "unpaid".into();
    s["mode"] = mode.into();
    s
}

pub async fn key_for(app: &TestApp) -> (uuid::Uuid, String) {
    let mut conn = app.db.conn().await;
    let account = new_account(&mut conn).await;
    let key = slate_events::access::create_key(
        &mut conn,
        account,
        Some("test"),
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    (account, key.plaintext)
}

impl TestApp {
    pub async fn post_json(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self
            .client
            .post(format!("{}{path}", self.address))
            .json(&body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Delete the account the key is of (`DELETE /v1/account`): the status.
    pub async fn delete_account(&self, key: &str) -> u16 {
        self.client
            .delete(format!("{}/v1/account", self.address))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Staff restore `account` (`POST /admin/accounts/{id}/restore`).
    pub async fn restore_as_staff(
        &self,
        staff_key: &str,
        account: impl std::fmt::Display,
    ) -> (u16, Value) {
        self.post_json(
            &format!("/admin/accounts/{account}/restore"),
            Some(staff_key),
            serde_json::json!({}),
        )
        .await
    }

    /// The account's export with `key` (expected 200), as text.
    pub async fn export(&self, key: &str) -> String {
        let r = self
            .client
            .get(format!("{}/v1/account/export", self.address))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.text().await.unwrap()
    }

    pub async fn get_as(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = self.client.get(format!("{}{path}", self.address));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn a_credit_pack_checkout_creates_a_stripe_session_for_the_account() {
    let stripe = MockServer::start().await;
    let app = billing_app(&stripe).await;
    let (account, key) = key_for(&app).await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .and(header("authorization", "Bearer sk_test_fake_0000"))
        .and(body_string_contains(format!(
            "client_reference_id={account}"
        )))
        .and(body_string_contains("metadata[credits]=500"))
        .and(body_string_contains("mode=payment"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(session_response(account, "payment")),
        )
        .expect(1)
        .mount(&stripe)
        .await;

    let (status, body) = app
        .post_json(
            "/v1/billing/checkout",
            Some(&key),
            json!({"price_id": "price_starter"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["url"],
        "https://checkout.stripe.com/c/pay/cs_test_created_1"
    );
    assert_eq!(
        (body["mode"].as_str(), body["credits"].as_i64()),
        (Some("payment"), Some(500))
    );

    // A plan makes a subscription session carrying the account in its metadata.
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .and(body_string_contains("mode=subscription"))
        .and(body_string_contains(format!(
            "subscription_data[metadata][slate_account_id]={account}"
        )))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(session_response(account, "subscription")),
        )
        .expect(1)
        .mount(&stripe)
        .await;
    let (status, body) = app
        .post_json(
            "/v1/billing/checkout",
            Some(&key),
            json!({"price_id": "price_pro_monthly"}),
        )
        .await;
    assert_eq!(
        (status, body["mode"].as_str()),
        (200, Some("subscription")),
        "{body}"
    );
}

#[tokio::test]
async fn checkout_mistakes_get_stable_codes() {
    let stripe = MockServer::start().await;
    let app = billing_app(&stripe).await;
    let (_, key) = key_for(&app).await;
    let cases = [
        (json!({"price_id": "price_unknown"}), 422, "unknown_price"),
        (
            json!({"price_id": "price_starter", "quantity": 0}),
            422,
            "invalid_quantity",
        ),
        (json!({"price": "price_starter"}), 422, "invalid_body"),
        (json!({"price_id": 5}), 422, "invalid_body"),
    ];
    for (body, status, code) in cases {
        let (s, b) = app
            .post_json("/v1/billing/checkout", Some(&key), body.clone())
            .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {b}"
        );
    }
    let r = app
        .client
        .post(format!("{}/v1/billing/checkout", app.address))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );

    // Stripe down: a 503 with a code, not a 500 and not a hang.
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(
            ResponseTemplate::new(500)
                .set_body_json(json!({"error": {"type": "api_error", "message": "boom"}})),
        )
        .mount(&stripe)
        .await;
    let (s, b) = app
        .post_json(
            "/v1/billing/checkout",
            Some(&key),
            json!({"price_id": "price_starter"}),
        )
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (503, Some("payment_provider_unavailable"))
    );

    // No customer yet: no portal.
    let (s, b) = app
        .post_json("/v1/billing/portal", Some(&key), json!({}))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("no_billing_customer"))
    );
}

#[tokio::test]
async fn the_billing_portal_opens_for_the_accounts_stripe_customer() {
    let stripe = MockServer::start().await;
    let app = billing_app(&stripe).await;
    let (account, key) = key_for(&app).await;
    sqlx::query("insert into stripe_customers (customer_id, account_id, linked_at) values ('cus_portal', $1, now())")
        .bind(account)
        .execute(&app.db.pool)
        .await
        .unwrap();
    Mock::given(method("POST"))
        .and(path("/v1/billing_portal/sessions"))
        .and(body_string_contains("customer=cus_portal"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": "bps_123", "object": "billing_portal.session", "configuration": "bpc_123",
            "created": 1795000000, "customer": "cus_portal", "customer_account": null, "flow": null,
            "livemode": false, "locale": null, "on_behalf_of": null,
            "return_url": "https://app.slate.test/billing",
            "url": "https://billing.stripe.com/p/session/test_123"
        })))
        .expect(1)
        .mount(&stripe)
        .await;
    let (s, b) = app
        .post_json("/v1/billing/portal", Some(&key), json!({}))
        .await;
    assert_eq!(
        (s, b["url"].as_str()),
        (200, Some("https://billing.stripe.com/p/session/test_123")),
        "{b}"
    );
}

#[tokio::test]
async fn routes_need_a_valid_live_key_and_show_only_the_owners_credits() {
    let stripe = MockServer::start().await;
    let app = billing_app(&stripe).await;
    let (alice, alice_key) = key_for(&app).await;
    let (_bob, bob_key) = key_for(&app).await;
    let mut conn = app.db.conn().await;
    crate::credits::grant(
        &mut conn,
        alice,
        70,
        slate_events::catalog::GrantSource::Goodwill,
        None,
    )
    .await;
    drop(conn);

    for key in [
        None,
        Some("nope"),
        Some("Bearer x"),
        Some("slate_live_000000000000_deadbeef"),
    ] {
        let (s, b) = app.get_as("/v1/credits", key).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{key:?}"
        );
        let (s, _) = app
            .post_json(
                "/v1/billing/checkout",
                key,
                json!({"price_id": "price_starter"}),
            )
            .await;
        assert_eq!(s, 401);
    }
    // A key with a right prefix and a wrong secret.
    let forged = format!("{}{}", &alice_key[..alice_key.len() - 4], "0000");
    assert_eq!(app.get_as("/v1/credits", Some(&forged)).await.0, 401);

    let (s, b) = app.get_as("/v1/credits", Some(&alice_key)).await;
    assert_eq!((s, b["available"].as_i64()), (200, Some(70)), "{b}");
    let (s, b) = app.get_as("/v1/credits", Some(&bob_key)).await;
    assert_eq!((s, b["available"].as_i64()), (200, Some(0)));

    app.db.settle_projections().await;
    let (s, b) = app.get_as("/v1/credits/ledger", Some(&alice_key)).await;
    assert_eq!(s, 200);
    assert_eq!(b["entries"].as_array().unwrap().len(), 1);
    assert_eq!(b["entries"][0]["available"], 70);
    let (_, b) = app.get_as("/v1/credits/ledger", Some(&bob_key)).await;
    assert!(b["entries"].as_array().unwrap().is_empty());
    // Empty values are absent ones (they were 400); a parameter the ledger
    // does not know, or a value that is no number, is refused, not ignored.
    let (s, b) = app
        .get_as("/v1/credits/ledger?cursor=&limit=", Some(&alice_key))
        .await;
    assert_eq!((s, b["entries"].as_array().map(Vec::len)), (200, Some(1)));
    for query in ["status=expired", "cursor=x", "limit=1.5"] {
        let (s, b) = app
            .get_as(&format!("/v1/credits/ledger?{query}"), Some(&alice_key))
            .await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{query}"
        );
    }

    // A revoked key stops working at once.
    let key_id: uuid::Uuid =
        sqlx::query_scalar("select key_id from api_keys where account_id = $1")
            .bind(alice)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let mut conn = app.db.conn().await;
    assert!(
        slate_events::access::revoke_key(
            &mut conn,
            alice,
            key_id,
            slate_events::Metadata::system()
        )
        .await
        .unwrap()
    );
    assert_eq!(app.get_as("/v1/credits", Some(&alice_key)).await.0, 401);
}

#[tokio::test]
async fn accounts_create_prints_the_key_alone_on_its_last_line_and_stores_only_its_hash() {
    let db = crate::harness::TestDb::new().await;
    let create = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_slate"))
            .args(["accounts", "create", "--email", "cli@example.com"])
            .args(extra)
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap()
    };
    // A wrong referral code creates nothing: the same command without it
    // then works (the account used to stay, keyless, its email taken).
    assert!(!create(&["--referral-code", "nosuchcode"]).status.success());
    let out = create(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_owned();
    assert!(key.starts_with("slate_live_"), "{stdout}");
    let mut conn = db.conn().await;
    let owner = slate_events::access::authenticate(&mut conn, &key)
        .await
        .unwrap()
        .owner()
        .unwrap();
    let stored: Vec<u8> = sqlx::query_scalar("select secret_hash from api_keys")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(stored.len(), 32);
    let log: String =
        sqlx::query_scalar("select string_agg(payload::text || metadata::text, ' ') from events")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert!(!log.contains(&key), "the key is in the log");
    assert!(
        !log.contains(key.rsplit('_').next().unwrap()),
        "the secret is in the log"
    );
    let _ = owner;
}
