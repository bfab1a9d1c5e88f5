//! Who may use what: every route refuses missing, malformed and revoked
//! credentials, hides other accounts' ids, and keeps staff routes to staff.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::billing::key_for;
use crate::http::{TestApp, spawn_app_with};

async fn call(app: &TestApp, method: &str, path: &str, key: Option<&str>) -> (u16, Value) {
    let url = format!("{}{path}", app.address);
    let mut req = match method {
        "GET" => app.client.get(url),
        "POST" => app.client.post(url).json(&json!({})),
        "DELETE" => app.client.delete(url),
        other => panic!("{other}"),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_route_refuses_missing_malformed_and_revoked_credentials_and_hides_other_accounts() {
    let app = spawn_app_with(&[]).await;
    let (alice, alice_key) = key_for(&app).await;
    let (_bob, bob_key) = key_for(&app).await;
    let g = app
        .grant_and_submit(
            alice,
            &alice_key,
            50,
            json!({"kind": "script", "provider": "local", "prompt": "alice's idea"}),
        )
        .await;
    let generation = g["id"].as_str().unwrap().to_owned();
    let alice_key_id: Uuid =
        sqlx::query_scalar("select key_id from api_keys where account_id = $1")
            .bind(alice)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();

    let routes = [
        ("GET", "/v1/credits".to_owned()),
        ("GET", "/v1/credits/ledger".to_owned()),
        ("POST", "/v1/billing/checkout".to_owned()),
        ("POST", "/v1/billing/portal".to_owned()),
        ("POST", "/v1/generations".to_owned()),
        ("GET", "/v1/generations".to_owned()),
        ("GET", format!("/v1/generations/{generation}")),
        ("POST", format!("/v1/generations/{generation}/cancel")),
        ("GET", format!("/v1/generations/{generation}/events")),
        ("GET", "/v1/webhooks/secret".to_owned()),
        ("GET", "/v1/keys".to_owned()),
        ("POST", "/v1/keys".to_owned()),
        ("DELETE", format!("/v1/keys/{alice_key_id}")),
        ("GET", format!("/admin/accounts/{alice}")),
        ("POST", "/admin/impersonations".to_owned()),
        ("DELETE", format!("/admin/impersonations/{generation}")),
        ("GET", "/v1/sessions".to_owned()),
        ("POST", "/v1/sessions/revoke-all".to_owned()),
        ("POST", "/v1/auth/totp".to_owned()),
    ];
    // An ended browser session.
    let ended_session = {
        let mut conn = app.db.conn().await;
        let s = slate_events::sessions::start(
            &mut conn,
            alice,
            "test",
            chrono::Duration::hours(1),
            slate_events::Metadata::system(),
        )
        .await
        .unwrap();
        slate_events::sessions::end(
            &mut conn,
            alice,
            s.session_id,
            "signed_out",
            slate_events::Metadata::system(),
        )
        .await
        .unwrap();
        s.token
    };
    let malformed = "slate_live_0123456789ab_not-a-key";
    let well_formed_unknown = {
        // Right shape and checksum, never issued.
        let mut conn = app.db.conn().await;
        let throwaway = crate::credits::new_account(&mut conn).await;
        let k = slate_events::access::create_key(
            &mut conn,
            throwaway,
            None,
            slate_events::Metadata::system(),
        )
        .await
        .unwrap();
        slate_events::access::revoke_key(
            &mut conn,
            throwaway,
            k.key_id,
            slate_events::Metadata::system(),
        )
        .await
        .unwrap();
        k.plaintext
    };
    for (method, path) in &routes {
        for key in [
            None,
            Some(malformed),
            Some(well_formed_unknown.as_str()),
            Some("Basic abc"),
        ] {
            let (status, body) = call(&app, method, path, key).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} with {key:?}"
            );
        }
        let url = format!("{}{path}", app.address);
        let req = match *method {
            "GET" => app.client.get(url),
            "POST" => app.client.post(url).json(&json!({})),
            _ => app.client.delete(url),
        };
        let r = req
            .header("cookie", format!("slate_session={ended_session}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            401,
            "{method} {path} with an ended session"
        );
    }
    // Another account's ids answer 404; staff routes answer 403 to non-staff.
    for (method, path) in &routes {
        if !path.contains(&generation)
            && !path.contains(&alice_key_id.to_string())
            && !path.starts_with("/admin")
        {
            continue;
        }
        let (status, _) = call(&app, method, path, Some(&bob_key)).await;
        let expected = if path.starts_with("/admin") { 403 } else { 404 };
        assert_eq!(status, expected, "bob on {method} {path}");
    }
    // Unauthenticated by design.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_ne!(call(&app, "GET", path, None).await.0, 401, "{path}");
    }
    assert_ne!(call(&app, "POST", "/webhooks/stripe", None).await.0, 401);

    // Failures are in the log, without the presented secret.
    let failures: i64 =
        sqlx::query_scalar("select count(*) from events where event_type = 'AuthenticationFailed'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(failures >= 3 * routes.len() as i64, "{failures}");
    let denials: i64 =
        sqlx::query_scalar("select count(*) from events where event_type = 'AccessDenied'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(denials, 3, "one per staff route bob tried");
    let log: String =
        sqlx::query_scalar("select string_agg(payload::text || metadata::text, ' ') from events")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    for secret in [
        &alice_key,
        &bob_key,
        &well_formed_unknown,
        &malformed.to_owned(),
    ] {
        assert!(
            !log.contains(secret.as_str()),
            "a presented credential reached the log"
        );
    }
}

#[tokio::test]
async fn keys_are_shown_once_listed_by_prefix_and_revoked_at_once() {
    let app = spawn_app_with(&[]).await;
    let (_, first) = key_for(&app).await;
    let (_, other) = key_for(&app).await;
    let (status, refused) = app.post_json("/v1/keys", Some(&first), json!([])).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (422, Some("invalid_body")),
        "a body that is not an object (it issued a key)"
    );
    let (status, created) = app
        .post_json("/v1/keys", Some(&first), json!({"label": "ci"}))
        .await;
    assert_eq!(status, 201, "{created}");
    let second = created["key"].as_str().unwrap().to_owned();
    assert!(slate_events::access::has_valid_checksum(&second));
    // One character changed (to something else than it was) breaks the checksum.
    let last = if second.ends_with('0') { '1' } else { '0' };
    assert!(!slate_events::access::has_valid_checksum(&format!(
        "{}{last}",
        &second[..second.len() - 1]
    )));
    let (_, listed) = app.get_as("/v1/keys", Some(&second)).await;
    let keys = listed["data"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(
        !listed.to_string().contains(&second[20..]),
        "no secret in the listing"
    );
    assert_eq!(keys[0]["label"], "ci");
    // The owner's label is sealed in the log (a purge erases it), opened
    // for the owner, in the list and in the export.
    let logged: String = sqlx::query_scalar(
        "select payload->>'label' from events where event_type = 'ApiKeyCreated'
          and payload->>'key_id' = $1",
    )
    .bind(keys[0]["key_id"].as_str().unwrap())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(slate_events::vault::is_sealed(&logged), "{logged}");
    let export: Value = serde_json::from_str(&app.export(&second).await).unwrap();
    let exported: Vec<&Value> = export["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["label"])
        .collect();
    assert!(exported.contains(&&json!("ci")), "{export}");

    // Rotation: the new key revokes the old one, which stops at once.
    let old_id = keys[1]["key_id"].as_str().unwrap();
    assert_eq!(app.get_as("/v1/credits", Some(&first)).await.0, 200);
    let r = app
        .client
        .delete(format!("{}/v1/keys/{old_id}", app.address))
        .bearer_auth(&second)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(app.get_as("/v1/credits", Some(&first)).await.0, 401);
    assert_eq!(app.get_as("/v1/credits", Some(&second)).await.0, 200);
    // Someone else's key id is not found, and revoking twice is a 404 too.
    let r = app
        .client
        .delete(format!("{}/v1/keys/{old_id}", app.address))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // Staff see an account, and the read is recorded.
    let (_, staff_key) = app.staff().await;
    let mut conn = app.db.conn().await;
    let target: Uuid = sqlx::query_scalar("select account_id from api_keys where key_id = $1")
        .bind(Uuid::parse_str(old_id).unwrap())
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let (status, body) = app
        .get_as(&format!("/admin/accounts/{target}"), Some(&staff_key))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credits"]["available"], 0);
    let reads: i64 = sqlx::query_scalar("select count(*) from events where event_type = 'StaffRead' and payload->>'account_id' = $1")
        .bind(target.to_string())
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(reads, 1);
}

#[tokio::test]
async fn impersonation_is_announced_attributed_to_both_and_expires_at_sixty_minutes() {
    let app = spawn_app_with(&[]).await;
    let (user, user_key) = key_for(&app).await;
    crate::credits::grant(
        &mut *app.db.conn().await,
        user,
        40,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;
    let (staff, staff_key) = app.staff().await;

    // Asking for more than 60 minutes gets 60, never more.
    let (status, i) = app
        .post_json(
            "/admin/impersonations",
            Some(&staff_key),
            json!({"account_id": user, "reason": "ticket 42: missing credits", "minutes": 600}),
        )
        .await;
    assert_eq!(status, 201, "{i}");
    let id = i["impersonation_id"].as_str().unwrap().to_owned();
    let started = chrono::DateTime::parse_from_rfc3339(i["started_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(i["expires_at"].as_str().unwrap()).unwrap();
    assert!(expires - started <= chrono::Duration::minutes(60) + chrono::Duration::seconds(1));
    // A non-staff account cannot start one or use one.
    assert_eq!(
        app.post_json(
            "/admin/impersonations",
            Some(&user_key),
            json!({"account_id": staff, "reason": "nope nope"})
        )
        .await
        .0,
        403
    );

    let as_user = |path: &str| {
        app.client
            .get(format!("{}{path}", app.address))
            .bearer_auth(&staff_key)
            .header("Slate-Impersonate", &id)
    };
    let r = as_user("/v1/credits").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let banner = r
        .headers()
        .get("slate-impersonation")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        banner.contains(&format!("staff={staff}")) && banner.contains(&format!("account={user}")),
        "{banner}"
    );
    assert_eq!(r.json::<Value>().await.unwrap()["available"], 40);
    // Without the header there is no banner.
    let plain = app
        .client
        .get(format!("{}/v1/credits", app.address))
        .bearer_auth(&user_key)
        .send()
        .await
        .unwrap();
    assert!(plain.headers().get("slate-impersonation").is_none());

    // An action under it is attributed to both people.
    let r = app
        .client
        .post(format!("{}/v1/generations", app.address))
        .bearer_auth(&staff_key)
        .header("Slate-Impersonate", &id)
        .json(&json!({"kind": "script", "provider": "local", "prompt": "on the user's behalf"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert!(r.headers().get("slate-impersonation").is_some());
    let meta: Value =
        sqlx::query_scalar("select metadata from events where event_type = 'GenerationRequested'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(meta["actor"]["account_id"], user.to_string());
    assert_eq!(meta["impersonator"], staff.to_string());
    // A search by the staff member as actor finds what they did as the user.
    // (It looked at the actor alone, the user, and found nothing of it.)
    app.db.settle_projections().await;
    let (status, page) = app
        .get_as(
            &format!("/admin/audit?actor={staff}&action=generation.requested"),
            Some(&staff_key),
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let found = page["data"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{page}");
    assert_eq!(
        (
            found[0]["actor_id"].as_str(),
            found[0]["impersonator"].as_str()
        ),
        (
            Some(user.to_string().as_str()),
            Some(staff.to_string().as_str())
        )
    );
    // The user's own export says staff acted, not from where: no address,
    // user agent or key id of the staff member's, in the events or the
    // audit entries. (It handed the staff member's over.)
    let export: Value = serde_json::from_str(&app.export(&user_key).await).unwrap();
    let by_staff: Vec<&Value> = export["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["metadata"])
        .chain(export["audit"].as_array().unwrap().iter())
        .filter(|m| {
            m["impersonator"] == staff.to_string()
                || m["actor"]["kind"] == "staff"
                || m["actor_kind"] == "staff"
        })
        .collect();
    assert!(by_staff.len() >= 3, "{export}");
    for m in by_staff {
        for field in ["ip", "user_agent", "api_key_id"] {
            assert!(m.get(field).is_none_or(Value::is_null), "{field} in {m}");
        }
    }
    let logged: i64 =
        sqlx::query_scalar("select count(*) from events where event_type = 'ImpersonatedRequest'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(logged, 2, "every request under it is recorded");
    // A user cannot use someone's impersonation id.
    let r = app
        .client
        .get(format!("{}/v1/credits", app.address))
        .bearer_auth(&user_key)
        .header("Slate-Impersonate", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // Sixty minutes later (clock injected) it is over, and recorded so.
    let mut conn = app.db.conn().await;
    let at = chrono::Utc::now() + chrono::Duration::minutes(61);
    let gone = slate_events::impersonation::resolve(&mut conn, staff, id.parse().unwrap(), at)
        .await
        .unwrap();
    assert!(gone.is_none());
    let ended: String = sqlx::query_scalar(
        "select payload->>'reason' from events where event_type = 'ImpersonationEnded'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(ended, "expired");
    assert_eq!(
        as_user("/v1/credits")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
}

/// What would outlive an impersonation, or act as someone else for good,
/// is refused under it; an account deleted meanwhile ends it, and a deleted
/// account cannot be impersonated.
#[tokio::test]
async fn an_impersonation_issues_no_credentials_and_ends_with_its_accounts_deletion() {
    let app = spawn_app_with(&[]).await;
    let (user, user_key) = key_for(&app).await;
    let (staff, staff_key) = app.staff().await;
    let (status, i) = app
        .post_json(
            "/admin/impersonations",
            Some(&staff_key),
            json!({"account_id": user, "reason": "ticket 43: a lost key"}),
        )
        .await;
    assert_eq!(status, 201, "{i}");
    let id = i["impersonation_id"].as_str().unwrap().to_owned();
    let as_user = |method: reqwest::Method, path: &str| {
        app.client
            .request(method, format!("{}{path}", app.address))
            .bearer_auth(&staff_key)
            .header("Slate-Impersonate", &id)
    };
    let code = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        (status, body["error"]["code"].as_str().map(str::to_owned))
    };
    let forbidden = (403, Some("impersonation_forbidden".to_owned()));
    let r = as_user(reqwest::Method::POST, "/v1/keys")
        .json(&json!({"label": "mine now"}))
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, forbidden, "no key for the account");
    let r = as_user(reqwest::Method::GET, "/v1/webhooks/secret")
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, forbidden, "no signing secret");
    let r = as_user(reqwest::Method::DELETE, "/v1/account")
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, forbidden, "no deletion");
    // Nor the user's billing account: the portal (payment methods, address,
    // the subscription), or a checkout that can offer its saved cards.
    let r = as_user(reqwest::Method::POST, "/v1/billing/portal")
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, forbidden, "no billing portal");
    let r = as_user(reqwest::Method::POST, "/v1/billing/checkout")
        .json(&json!({"price_id": "price_starter", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, forbidden, "no checkout");
    // Nor signing the user out everywhere and revoking their keys: the
    // user's own security action (a staff target's keys too).
    let r = as_user(reqwest::Method::POST, "/v1/sessions/revoke-all")
        .json(&json!({"include_keys": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, forbidden, "no sign-out everywhere");
    // Staff routes are not reached through it; the refusal is recorded
    // against the staff member who asked.
    let r = as_user(reqwest::Method::GET, &format!("/admin/accounts/{user}"))
        .send()
        .await
        .unwrap();
    assert_eq!(code(r).await, (403, Some("forbidden".to_owned())));
    let denied: Vec<String> = sqlx::query_scalar(
        "select payload->>'account_id' from events where event_type = 'AccessDenied'",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(denied, [staff.to_string()]);
    let (keys, deleted): (i64, bool) = sqlx::query_as(
        "select (select count(*) from api_keys where account_id = $1),
                (select deleted_at is not null from accounts where account_id = $1)",
    )
    .bind(user)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((keys, deleted), (1, false), "nothing was written");
    // Reads go on as before.
    let r = as_user(reqwest::Method::GET, "/v1/credits")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // The user deletes the account: the impersonation ends with it.
    assert_eq!(app.delete_account(&user_key).await, 202);
    let r = as_user(reqwest::Method::GET, "/v1/credits")
        .send()
        .await
        .unwrap();
    assert_eq!(
        code(r).await,
        (403, Some("impersonation_invalid".to_owned()))
    );
    let ended: String = sqlx::query_scalar(
        "select payload->>'reason' from events where event_type = 'ImpersonationEnded'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(ended, "account_deleted");
    // Nor can a new one begin.
    let (status, body) = app
        .post_json(
            "/admin/impersonations",
            Some(&staff_key),
            json!({"account_id": user, "reason": "ticket 44: after the deletion"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_impersonation")),
        "{body}"
    );
    // Nor of another staff member: their sessions and keys are theirs.
    let (other_staff, _) = app.staff().await;
    let (status, body) = app
        .post_json(
            "/admin/impersonations",
            Some(&staff_key),
            json!({"account_id": other_staff, "reason": "ticket 45: a colleague"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("invalid_impersonation")),
        "{body}"
    );
}

#[tokio::test]
async fn an_unscoped_query_under_an_accounts_setting_sees_only_that_accounts_rows() {
    let app = spawn_app_with(&[]).await;
    let (alice, alice_key) = key_for(&app).await;
    let (bob, bob_key) = key_for(&app).await;
    for (account, key) in [(alice, &alice_key), (bob, &bob_key)] {
        crate::credits::grant(
            &mut *app.db.conn().await,
            account,
            20,
            slate_events::catalog::GrantSource::Purchase,
            None,
        )
        .await;
        for i in 0..2 {
            let (status, _, _) = app
                .submit(
                    key,
                    None,
                    json!({"kind": "script", "provider": "local", "prompt": format!("p{i}")}),
                )
                .await;
            assert_eq!(status, 202);
        }
    }
    let count = |account: Option<Uuid>, table: &'static str| {
        let pool = app.db.pool.clone();
        async move {
            let mut tx = match account {
                Some(a) => slate::http::scoped::scoped(&pool, a).await.unwrap(),
                None => {
                    let mut tx = pool.begin().await.unwrap();
                    sqlx::query("set local role slate_rls")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx
                }
            };
            // Deliberately no WHERE clause.
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "select count(*) from {table}"
            )))
            .fetch_one(&mut *tx)
            .await
            .unwrap()
        }
    };
    for table in [
        "generations",
        "credit_buckets",
        "credit_reservations",
        "api_keys",
        "accounts",
        "account_keys",
    ] {
        let all: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        let mine = count(Some(alice), table).await;
        assert!(mine > 0 && mine < all, "{table}: {mine} of {all}");
        let theirs: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select count(*) from {table} where account_id = $1"
        )))
        .bind(alice)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(mine, theirs, "{table}");
        assert_eq!(count(None, table).await, 0, "{table}: no setting, no rows");
    }
    // The API's reads go through it and still work.
    let (_, list) = app.get_as("/v1/generations", Some(&alice_key)).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        app.get_as("/v1/credits", Some(&bob_key)).await.1["reserved"],
        2
    );
}

#[tokio::test]
async fn the_export_holds_every_event_of_the_account_and_nothing_of_another() {
    let app = spawn_app_with(&[]).await;
    let (alice, alice_key) = key_for(&app).await;
    let (bob, bob_key) = key_for(&app).await;
    for (account, key) in [(alice, &alice_key), (bob, &bob_key)] {
        app.grant_and_submit(
            account,
            key,
            20,
            json!({"kind": "voiceover", "provider": "local", "prompt": "hello there"}),
        )
        .await;
    }
    app.run_generations().await;
    app.db.settle_projections().await;
    let bundle: Value = serde_json::from_str(&app.export(&alice_key).await).unwrap();
    let exported: std::collections::BTreeSet<String> = bundle["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: std::collections::BTreeSet<String> = sqlx::query_scalar::<_, Uuid>(
        "select event_id from events where payload->>'account_id' = $1 or stream_id = 'account-' || $1",
    )
    .bind(alice.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|u| u.to_string())
    .collect();
    assert!(!expected.is_empty());
    assert_eq!(exported, expected, "every event of the account");
    let text = bundle.to_string();
    assert!(
        !text.contains(&bob.to_string()),
        "nothing of another account"
    );
    assert_eq!(bundle["account"]["account_id"], alice.to_string());
    let created = bundle["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "AccountCreated")
        .unwrap();
    assert_eq!(
        created["payload"]["email"], bundle["account"]["email"],
        "personal fields sealed in the log are opened for their owner"
    );
    assert!(!slate_events::vault::is_sealed(
        created["payload"]["email"].as_str().unwrap()
    ));
    assert_eq!(bundle["generations"].as_array().unwrap().len(), 1);
    assert!(
        bundle["generations"][0]["output_url"]
            .as_str()
            .unwrap()
            .starts_with("http")
    );
    assert_eq!(
        bundle["generations"][0]["prompt"], "hello there",
        "the user's own prompts are theirs to export"
    );
    assert!(!bundle["keys"].as_array().unwrap().is_empty());
    assert!(!text.contains(&alice_key), "keys by prefix only");
    assert!(!bundle["ledger"].as_array().unwrap().is_empty());
    assert!(!bundle["audit"].as_array().unwrap().is_empty());
}

/// The long sections of an export (events, ledger, generations, audit) are
/// read page by page, never whole: with more of each than a page holds
/// (generations created in the same microsecond across a page's edge), the
/// bundle holds every row once, in order.
#[tokio::test]
async fn a_long_export_holds_every_row_of_every_section_once() {
    let app = spawn_app_with(&[]).await;
    let (alice, key) = key_for(&app).await;
    let (bob, _) = key_for(&app).await;
    for (account, n) in [(alice, 1_201), (bob, 3)] {
        sqlx::query(
            "with n as (select i from generate_series(1, $2) i)
             , ledger as (
                insert into credit_ledger_entries (global_position, account_id, event_type,
                        delta_available, delta_reserved, delta_debt, recorded_at)
                select 1000000 * $3 + i, $1, 'CreditsGranted', i, 0, 0, now() from n)
             , audit as (
                insert into audit_entries (position, event_id, at, actor_kind, action, account_id, outcome)
                select 1000000 * $3 + i, gen_random_uuid(), now(), 'system', 'test.row', $1, 'ok' from n)
             insert into generations (generation_id, account_id, kind, provider, operation, units, cost,
                    collection_id, status, created_at, updated_at)
             select gen_random_uuid(), $1, 'script', 'local', 'script', 1, 1, 'default', 'succeeded',
                    timestamptz '2026-12-01' + (i / 7) * interval '1 second', now()
               from n where i <= 501",
        )
        .bind(account)
        .bind(n)
        .bind(if account == alice { 1 } else { 2 })
        .execute(&app.db.pool)
        .await
        .unwrap();
    }
    let bundle: Value = serde_json::from_str(&app.export(&key).await).unwrap();
    let column = |section: &str, field: &str| -> Vec<String> {
        bundle[section]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row[field].to_string())
            .collect()
    };
    let ledger = column("ledger", "global_position");
    assert_eq!(ledger.len(), 1_201);
    assert!(
        ledger
            .iter()
            .zip(1..)
            .all(|(p, i)| *p == (1_000_000 + i).to_string())
    );
    let audit = column("audit", "position");
    let inserted: Vec<i64> = audit
        .iter()
        .map(|p| p.parse::<i64>().unwrap())
        .filter(|&p| p > 1_000_000)
        .collect();
    assert_eq!(
        inserted,
        (1_000_001..=1_001_201).collect::<Vec<i64>>(),
        "every audit row of the account, once, in order"
    );
    let generations = column("generations", "generation_id");
    let stored: Vec<String> = sqlx::query_scalar::<_, Uuid>(
        "select generation_id from generations where account_id = $1
          order by created_at, generation_id",
    )
    .bind(alice)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|id| json!(id).to_string())
    .collect();
    assert_eq!(stored.len(), 501);
    assert_eq!(generations, stored, "every generation once, in order");
    assert!(!bundle.to_string().contains(&bob.to_string()));
}

/// The export reads an account's events through its own index entries, not
/// by walking the log: among 20,000 events of other accounts (before,
/// between and after the account's), pages of two hold the account's
/// events in log order, each once (its `AccountCreated` is in its stream
/// and names it too), without an affiliate's commission on it; and a page's
/// plan reads no event but the account's, where the walk of the log (which
/// PostgreSQL chose for a filter with `or` when a page is small beside the
/// matches it expects) read every other account's.
#[tokio::test]
async fn the_exports_pages_read_the_accounts_events_only() {
    let db = crate::harness::TestDb::new().await;
    let mut conn = db.conn().await;
    let others = |n: i64| {
        sqlx::query(
            "insert into events (event_id, stream_id, stream_version, event_type, schema_version, payload)
             select gen_random_uuid(), 'others-' || gen_random_uuid(), 1, 'Unrelated', 1,
                    jsonb_build_object('account_id', gen_random_uuid(), 'amount', 1)
               from generate_series(1, $1)",
        )
        .bind(n)
    };
    others(5_000).execute(&mut *conn).await.unwrap();
    let alice = crate::credits::new_account(&mut conn).await;
    others(10_000).execute(&mut *conn).await.unwrap();
    crate::credits::grant(
        &mut conn,
        alice,
        5,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;
    crate::credits::new_key(&mut conn, alice).await;
    sqlx::query(
        "insert into events (event_id, stream_id, stream_version, event_type, schema_version, payload)
         values (gen_random_uuid(), 'affiliate-' || gen_random_uuid(), 1, 'CommissionEarned', 1,
                 jsonb_build_object('account_id', $1::text, 'amount', 1))",
    )
    .bind(alice)
    .execute(&mut *conn)
    .await
    .unwrap();
    others(5_000).execute(&mut *conn).await.unwrap();
    sqlx::query("analyze events")
        .execute(&mut *conn)
        .await
        .unwrap();

    let expected: Vec<Uuid> = sqlx::query_scalar(
        "select event_id from events
          where (payload->>'account_id' = $1::text or stream_id = 'account-' || $1::text)
            and event_type not like 'Commission%'
          order by global_position",
    )
    .bind(alice)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert!(expected.len() >= 3, "{expected:?}");
    let mut keyring = slate_events::vault::Keyring::default();
    let (mut exported, mut after) = (Vec::new(), 0);
    loop {
        let page =
            slate_events::accounts::export_events_page(&mut conn, &mut keyring, alice, after, 2)
                .await
                .unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = last["position"].as_i64().unwrap();
        exported.extend(
            page.iter()
                .map(|e| e["event_id"].as_str().unwrap().parse::<Uuid>().unwrap()),
        );
    }
    assert_eq!(exported, expected);

    let mut tx = db.pool.begin().await.unwrap();
    let plan: Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "explain (analyze, format json) {}",
        slate_events::accounts::EXPORT_EVENTS_PAGE
    )))
    .bind(alice)
    .bind(0i64)
    .bind(2i64)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let (mut removed, mut todo) = (0, vec![&plan[0]["Plan"]]);
    while let Some(node) = todo.pop() {
        if node["Relation Name"] == "events" {
            assert_ne!(node["Node Type"], "Seq Scan", "{plan}");
            for k in ["Rows Removed by Filter", "Rows Removed by Index Recheck"] {
                removed += node[k].as_i64().unwrap_or(0);
            }
        }
        if let Some(children) = node["Plans"].as_array() {
            todo.extend(children);
        }
    }
    assert!(
        removed <= 1,
        "at most the commission is read and left out: {plan}"
    );
}

#[tokio::test]
async fn deleting_an_account_stops_access_at_once_and_staff_can_restore_it_within_thirty_days() {
    let app = spawn_app_with(&[]).await;
    let (account, key) = key_for(&app).await;
    let g = app
        .grant_and_submit(
            account,
            &key,
            20,
            json!({"kind": "script", "provider": "local", "prompt": "draft"}),
        )
        .await;
    let generation = g["id"].as_str().unwrap().to_owned();

    assert_eq!(app.delete_account(&key).await, 202);
    assert_eq!(
        app.get_as("/v1/credits", Some(&key)).await.0,
        401,
        "access stops at once"
    );
    let (status, reason): (String, Option<String>) = sqlx::query_as(
        "select status, failure_code from generations where generation_id = $1::uuid",
    )
    .bind(&generation)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("canceled", Some("account_deleted"))
    );
    let b = slate_events::credits::balance(&mut *app.db.conn().await, account)
        .await
        .unwrap();
    assert_eq!(
        (b.available, b.reserved),
        (20, 0),
        "the queued generation was released"
    );
    let job: String = sqlx::query_scalar(
        "select status::text from apalis.jobs
          where convert_from(job, 'UTF8')::jsonb ->> 'generation_id' = $1",
    )
    .bind(&generation)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(job, "Done", "and its job withdrawn, not left for its turn");

    // Staff restore it within the grace period; a new key works.
    let (_, staff_key) = app.staff().await;
    let (status, body) = app.restore_as_staff(&staff_key, account).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        app.get_as("/v1/credits", Some(&key)).await.0,
        401,
        "old keys stay revoked"
    );
    let fresh = slate_events::access::create_key(
        &mut *app.db.conn().await,
        account,
        None,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap()
    .plaintext;
    let (status, credits) = app.get_as("/v1/credits", Some(&fresh)).await;
    assert_eq!(
        (status, credits["available"].as_i64()),
        (200, Some(20)),
        "everything is back"
    );
    let (status, _) = app.restore_as_staff(&staff_key, account).await;
    assert_eq!(status, 409, "not deleted any more");
    let (status, body) = app
        .post_json(
            &format!("/admin/accounts/{}/restore", Uuid::new_v4()),
            Some(&staff_key),
            json!({}),
        )
        .await;
    assert_eq!(status, 404, "unknown account: {body}");

    // After 30 days (clock injected) it cannot be restored.
    delete_committed(&app.db.pool, account, chrono::Utc::now()).await;
    let late = chrono::Utc::now() + chrono::Duration::days(31);
    assert_eq!(
        restore_at(&app.db.pool, account, late).await,
        slate_events::accounts::Restore::NotRestorable
    );
    assert!(
        slate_events::projections::verify(&app.db.pool, slate_events::projections::Projection::ALL)
            .await
            .unwrap()
            .is_clean()
    );
}

/// A path id that does not decode (percent-escapes that are not UTF-8) names
/// nothing: 404 `not_found` in the error format, never axum's plain-text
/// 400; and an audit bound beyond the years PostgreSQL holds is the
/// client's `invalid_query`, not a 500 or an export cut short.
#[tokio::test]
async fn undecodable_ids_and_out_of_range_times_get_stable_codes() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = key_for(&app).await;
    let (_, staff_key) = app.staff().await;
    let send = |method: reqwest::Method, path: &str, key: &str| {
        app.client
            .request(method, format!("{}{path}", app.address))
            .bearer_auth(key)
            .send()
    };
    let cases = [
        (reqwest::Method::GET, "/v1/generations/%FF", &key),
        (reqwest::Method::POST, "/v1/generations/%FF/cancel", &key),
        (reqwest::Method::GET, "/v1/generations/%FF%FE/events", &key),
        (reqwest::Method::DELETE, "/v1/keys/%C3%28", &key),
        (reqwest::Method::DELETE, "/v1/sessions/%FF", &key),
        (reqwest::Method::GET, "/admin/accounts/%FF", &staff_key),
        (reqwest::Method::GET, "/admin/audit/%FF", &staff_key),
    ];
    for (method, path, key) in cases {
        let r = send(method.clone(), path, key).await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}: {body}"
        );
    }
    for path in [
        "/admin/audit?from=-5000-01-01T00:00:00Z",
        "/admin/audit?to=%2B200000-01-01T00:00:00Z",
        "/admin/audit/export?from=-0001-12-31T00:00:00Z",
    ] {
        let r = send(reqwest::Method::GET, path, &staff_key).await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{path}: {body}"
        );
    }
    // The years PostgreSQL holds still work.
    let r = send(
        reqwest::Method::GET,
        "/admin/audit?from=0001-01-01T00:00:00Z&to=9999-12-31T00:00:00Z",
        &staff_key,
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// A script of the local provider: what an authenticated submission asks
/// for.
fn video_for(account: Uuid) -> slate_events::generations::Submission {
    slate_events::generations::Submission {
        generation_id: Uuid::now_v7(),
        account_id: account,
        kind: "script".into(),
        provider: "local".into(),
        tier: None,
        units: 1,
        collection_id: "default".into(),
        prompt: Some("a lighthouse at dusk".into()),
        input_key: None,
        parameters: json!({}),
        deadline: None,
        webhook_url: None,
        hold_until: chrono::Utc::now() + chrono::Duration::hours(1),
    }
}

#[tokio::test]
async fn a_submission_authenticated_before_a_deletion_never_runs_for_the_deleted_account() {
    use slate_events::generations::Submitted;
    let db = crate::harness::TestDb::new().await;
    let mut conn = db.conn().await;
    let meta = slate_events::Metadata::system();
    let delete = |account: Uuid| {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            delete_committed(&pool, account, chrono::Utc::now()).await;
        })
    };
    let released = async |account: Uuid| {
        let b = slate_events::credits::balance(&mut *db.conn().await, account)
            .await
            .unwrap();
        (b.available, b.reserved)
    };

    // In flight: the submission has reserved and recorded, not committed,
    // when the deletion starts. The deletion waits for it, then cancels it.
    let alice = with_50_credits(&mut conn).await;
    let submission = video_for(alice);
    let mut tx = db.pool.begin().await.unwrap();
    let (outcome, _wake) = slate_workers::generations::submit(&mut tx, &submission, &meta, 5)
        .await
        .unwrap();
    assert!(matches!(outcome, Submitted::Accepted { .. }));
    let deletion = delete(alice);
    db.until_waiting_for_a_lock(&deletion, "the deletion never ran")
        .await;
    tx.commit().await.unwrap();
    deletion.await.unwrap();
    let (status, reason): (String, Option<String>) =
        sqlx::query_as("select status, failure_code from generations where generation_id = $1")
            .bind(submission.generation_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), reason.as_deref()),
        ("canceled", Some("account_deleted")),
        "the deletion saw the submission that committed while it waited"
    );
    assert_eq!(released(alice).await, (50, 0));

    // After: the deletion committed first; the submission is refused and
    // writes nothing.
    let bob = with_50_credits(&mut conn).await;
    delete(bob).await.unwrap();
    let submission = video_for(bob);
    let mut tx = db.pool.begin().await.unwrap();
    let (outcome, wake) = slate_workers::generations::submit(&mut tx, &submission, &meta, 5)
        .await
        .unwrap();
    assert_eq!(outcome, Submitted::AccountDeleted);
    drop(wake);
    tx.rollback().await.unwrap();
    let rows: i64 = sqlx::query_scalar("select count(*) from generations where account_id = $1")
        .bind(bob)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(released(bob).await, (50, 0));

    // The deletion first, not committed yet, when the submission arrives:
    // the submission waits for it and is refused.
    let carol = with_50_credits(&mut conn).await;
    let mut deletion = db.pool.begin().await.unwrap();
    slate_events::accounts::request_deletion(
        &mut deletion,
        carol,
        chrono::Utc::now(),
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    let pool = db.pool.clone();
    let submitting = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let outcome = slate_workers::generations::submit(
            &mut tx,
            &video_for(carol),
            &slate_events::Metadata::system(),
            5,
        )
        .await
        .map(|(outcome, _wake)| outcome);
        tx.rollback().await.unwrap();
        outcome
    });
    db.until_waiting_for_a_lock(&submitting, "the submission never ran")
        .await;
    deletion.commit().await.unwrap();
    let outcome = submitting.await.unwrap();
    assert!(
        matches!(outcome, Ok(Submitted::AccountDeleted)),
        "{outcome:?}"
    );
    assert_eq!(released(carol).await, (50, 0));
}

/// A deletion ends its account's open generations the way their workers
/// take turns with them, before it locks the credit row:
/// - A worker that read a generation as queued, recording the attempt's
///   start while the deletion is under way, waits for the deletion and
///   finds the generation canceled: no provider gets its prompt. (The start
///   took no turn with the deletion, read `queued`, and was recorded after
///   the cancellation: the attempt went to the provider for a deleted
///   account.)
/// - A worker recording an outcome (its event appended, the capture next)
///   while the deletion runs is waited for, and both commit. (The deletion
///   held the credit row while it waited for the outcome's stream, and the
///   capture waited for the credit row: a deadlock, one of them aborted.)
#[tokio::test]
async fn a_deletion_takes_turns_with_a_workers_start_and_outcome() {
    use slate_events::generations::{self, Start};
    let db = crate::harness::TestDb::new().await;
    let mut conn = db.conn().await;
    let meta = slate_events::Metadata::system();
    let submitted = async |account: Uuid| {
        let submission = video_for(account);
        let mut tx = db.pool.begin().await.unwrap();
        let (_, _wake) = slate_workers::generations::submit(&mut tx, &submission, &meta, 5)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        submission.generation_id
    };
    let read = async |id: Uuid| {
        generations::get_any(&mut *db.conn().await, id)
            .await
            .unwrap()
            .unwrap()
    };

    let alice = with_50_credits(&mut conn).await;
    let id = submitted(alice).await;
    let as_the_worker_read_it = read(id).await;
    let mut deletion = db.pool.begin().await.unwrap();
    slate_events::accounts::request_deletion(
        &mut deletion,
        alice,
        chrono::Utc::now(),
        meta.clone(),
    )
    .await
    .unwrap();
    let pool = db.pool.clone();
    let starting = tokio::spawn(async move {
        let mut conn = pool.acquire().await.unwrap();
        generations::record_started(
            &mut conn,
            &as_the_worker_read_it,
            1,
            &slate_events::Metadata::system(),
        )
        .await
        .unwrap()
    });
    db.until_waiting_for_a_lock(&starting, "the start never ran")
        .await;
    deletion.commit().await.unwrap();
    assert_eq!(starting.await.unwrap(), Start::Finished);
    assert_eq!(
        db.generation_log(id).await,
        ["GenerationRequested", "GenerationCanceled"]
    );

    let bob = with_50_credits(&mut conn).await;
    let id = submitted(bob).await;
    let g = read(id).await;
    assert_eq!(
        generations::record_started(&mut conn, &g, 1, &meta)
            .await
            .unwrap(),
        Start::Running
    );
    // The worker's outcome, as `generations::succeed` records it: the
    // event, then the capture.
    let mut worker = db.pool.begin().await.unwrap();
    let outcome = slate_events::store::NewEvent {
        event_id: slate_events::store::deterministic_event_id(&format!("generation-outcome:{id}")),
        event: slate_events::DomainEvent::GenerationSucceeded(
            slate_events::catalog::GenerationSucceeded {
                generation_id: id,
                account_id: bob,
                output_key: format!("users/{bob}/out.txt"),
                content_type: "text/plain".into(),
                bytes: 5,
                width: None,
                height: None,
                duration_ms: None,
            },
        ),
        metadata: meta.clone(),
    };
    slate_events::store::append_and_apply(
        &mut worker,
        &format!("generation-{id}"),
        slate_events::store::ExpectedVersion::Any,
        &outcome,
    )
    .await
    .unwrap();
    let pool = db.pool.clone();
    let deleting = tokio::spawn(async move {
        let mut tx = pool.begin().await?;
        slate_events::accounts::request_deletion(
            &mut tx,
            bob,
            chrono::Utc::now(),
            slate_events::Metadata::system(),
        )
        .await
        .map_err(|e| sqlx::Error::Protocol(format!("{e:?}")))?;
        tx.commit().await
    });
    db.until_waiting_for_a_lock(&deleting, "the deletion never ran")
        .await;
    let captured = slate_events::credits::capture(&mut worker, id, &meta).await;
    assert!(captured.is_ok(), "the worker's capture: {captured:?}");
    worker.commit().await.unwrap();
    let deleted = deleting.await.unwrap();
    assert!(deleted.is_ok(), "the deletion: {deleted:?}");
    let b = slate_events::credits::balance(&mut conn, bob)
        .await
        .unwrap();
    assert_eq!((b.reserved, b.available < 50), (0, true), "{b:?}");
    assert_eq!(read(id).await.status, "succeeded");
}

/// A new account with 50 purchased credits.
async fn with_50_credits(conn: &mut sqlx::PgConnection) -> Uuid {
    let account = crate::credits::new_account(conn).await;
    crate::credits::grant(
        conn,
        account,
        50,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;
    account
}

/// Delete `account` at `at` in a transaction of its own, committed (no job
/// enqueued: the domain call alone).
/// Restore `account` by the domain call, at `at` (a clock of the test's
/// choosing), as the system.
pub async fn restore_at(
    pool: &sqlx::PgPool,
    account: Uuid,
    at: chrono::DateTime<chrono::Utc>,
) -> slate_events::accounts::Restore {
    slate_events::accounts::restore(
        &mut pool.acquire().await.unwrap(),
        account,
        at,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap()
}

pub async fn delete_committed(
    pool: &sqlx::PgPool,
    account: Uuid,
    at: chrono::DateTime<chrono::Utc>,
) {
    let mut tx = pool.begin().await.unwrap();
    slate_events::accounts::request_deletion(
        &mut tx,
        account,
        at,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// A key's last use is kept to the minute: the first request writes it, a
/// request within the minute leaves it, one after the minute writes it again.
#[tokio::test]
async fn a_keys_last_use_is_written_at_most_once_a_minute() {
    type At = Option<chrono::DateTime<chrono::Utc>>;
    let app = spawn_app_with(&[]).await;
    let (alice, key) = key_for(&app).await;
    let last_used = || async {
        sqlx::query_scalar::<_, At>("select last_used_at from api_keys where account_id = $1")
            .bind(alice)
            .fetch_one(&app.db.pool)
            .await
            .unwrap()
    };
    let pool = &app.db.pool;
    let set_back = |seconds: i32| async move {
        sqlx::query(
            "update api_keys set last_used_at = now() - $2 * interval '1 second'
              where account_id = $1",
        )
        .bind(alice)
        .bind(seconds)
        .execute(pool)
        .await
        .unwrap();
    };
    assert_eq!(last_used().await, None);
    assert_eq!(call(&app, "GET", "/v1/credits", Some(&key)).await.0, 200);
    assert!(last_used().await.is_some());

    set_back(30).await;
    let half_a_minute_ago = last_used().await;
    // Within the minute no update of the keys is even tried: a request goes
    // through while another transaction keeps the table from being written
    // (an update waits for that lock, whether or not a row matches).
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("lock table api_keys in share mode")
        .execute(&mut *holder)
        .await
        .unwrap();
    let through = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        call(&app, "GET", "/v1/credits", Some(&key)),
    )
    .await;
    holder.rollback().await.unwrap();
    assert_eq!(
        through.expect("the request waited to write the keys").0,
        200
    );
    assert_eq!(last_used().await, half_a_minute_ago);

    set_back(90).await;
    let before = last_used().await;
    assert_eq!(call(&app, "GET", "/v1/credits", Some(&key)).await.0, 200);
    let listed = call(&app, "GET", "/v1/keys", Some(&key)).await.1;
    let shown = listed["data"][0]["last_used_at"]
        .as_str()
        .unwrap_or_default();
    let shown = chrono::DateTime::parse_from_rfc3339(shown).expect("a time");
    assert!(last_used().await > before);
    assert_eq!(Some(shown.to_utc()), last_used().await, "{listed}");
}
