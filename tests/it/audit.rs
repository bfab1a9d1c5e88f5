//! Audit-log investigation by staff.

use serde_json::{Value, json};
use uuid::Uuid;

use crate::billing::key_for;
use crate::http::{TestApp, spawn_app_with};

/// Every entry of an account, oldest first, following the cursor.
async fn trail(app: &TestApp, key: &str, account: Uuid) -> Vec<Value> {
    let mut out = pages(app, key, &format!("/admin/audit?account={account}&limit=3")).await;
    out.reverse();
    out
}

/// Every entry `path` (a query with its filters) pages through, newest
/// first, following the cursor.
async fn pages(app: &TestApp, key: &str, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let path = match cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_owned(),
        };
        let (status, page) = app.get_as(&path, Some(key)).await;
        assert_eq!(status, 200, "{page}");
        out.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    out
}

#[tokio::test]
async fn a_failed_generations_trail_is_followed_from_the_account_id_alone() {
    let app = spawn_app_with(&[]).await;
    let (account, key) = key_for(&app).await;
    crate::credits::grant(
        &mut *app.db.conn().await,
        account,
        10,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;
    let (_, g, _) = app
        .submit(&key, None, json!({"kind": "script", "provider": "local", "prompt": "secret plot", "parameters": {"fail": "permanent"}}))
        .await;
    let generation = g["id"].as_str().unwrap().to_owned();
    app.run_generations().await;
    app.db.settle_projections().await;
    let (_, staff) = app.staff().await;
    let entries = trail(&app, &staff, account).await;
    let actions: Vec<&str> = entries
        .iter()
        .filter(|e| e["targets"]["generation"] == generation.as_str())
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec![
            "credits.reserved",
            "generation.requested",
            "generation.started",
            "generation.failed",
            "credits.released"
        ]
    );
    // The submission's entry says where it came from.
    let requested = entries
        .iter()
        .find(|e| e["action"] == "generation.requested")
        .unwrap();
    assert!(
        requested["request_id"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{requested}"
    );
    assert_eq!(requested["ip"], "127.0.0.1");
    assert!(requested["api_key_id"].as_str().is_some());
    assert_eq!(requested["actor_kind"], "user");
    let failed = entries
        .iter()
        .find(|e| e["action"] == "generation.failed")
        .unwrap();
    assert_eq!(
        (failed["outcome"].as_str(), failed["reason"].as_str()),
        (Some("failed"), Some("content_policy"))
    );
    assert!(
        !serde_json::to_string(&entries)
            .unwrap()
            .contains("secret plot"),
        "never a prompt"
    );

    // Non-staff cannot search; staff searches are themselves audited.
    assert_eq!(
        app.get_as(&format!("/admin/audit?account={account}"), Some(&key))
            .await
            .0,
        403
    );
    app.db.settle_projections().await;
    let (_, reads) = app
        .get_as("/admin/audit?action=staff.read", Some(&staff))
        .await;
    assert!(!reads["data"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_stripe_refunds_trail_leads_from_the_account_to_the_webhook_that_caused_it() {
    let app = crate::stripe::stripe_app().await;
    let account = crate::credits::new_account(&mut *app.db.conn().await).await;
    let run = Uuid::new_v4().simple().to_string()[..10].to_owned();
    for name in [
        "01_checkout_session_completed_pack",
        "09_charge_refunded_partial",
    ] {
        assert_eq!(
            app.deliver(&crate::stripe::fixture(name, account, &run))
                .await
                .0,
            200
        );
    }
    app.process_stripe().await;
    app.db.settle_projections().await;
    let (_, staff) = app.staff().await;
    let entries = trail(&app, &staff, account).await;
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    let granted = actions
        .iter()
        .position(|a| *a == "credits.granted")
        .unwrap();
    let revoked = actions
        .iter()
        .position(|a| *a == "credits.revoked")
        .unwrap();
    assert!(granted < revoked, "{actions:?}");
    let revoke = &entries[revoked];
    assert_eq!(revoke["actor_kind"], "stripe");
    assert_eq!(revoke["targets"]["stripe_event"], format!("evt_{run}_09"));

    // From the entry: its causing event and the webhook that caused it.
    let (status, detail) = app
        .get_as(&format!("/admin/audit/{}", revoke["seq"]), Some(&staff))
        .await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["cause"]["event_type"], "CreditsRevoked");
    let related: Vec<&str> = detail["related"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(related.contains(&"stripe.event_received"), "{related:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pagination_while_appends_continue_returns_every_entry_exactly_once() {
    let app = spawn_app_with(&[]).await;
    let (account, _) = key_for(&app).await;
    for _ in 0..25 {
        crate::credits::grant(
            &mut *app.db.conn().await,
            account,
            1,
            slate_events::catalog::GrantSource::Promotion,
            None,
        )
        .await;
    }
    app.db.settle_projections().await;
    let (_, staff) = app.staff().await;
    let existing: Vec<i64> = sqlx::query_scalar("select seq from audit_entries order by seq")
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writer = {
        let pool = app.db.pool.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !*stop_rx.borrow_and_update() {
                let mut conn = pool.acquire().await.unwrap();
                crate::credits::grant(
                    &mut conn,
                    account,
                    1,
                    slate_events::catalog::GrantSource::Promotion,
                    None,
                )
                .await;
                drop(conn);
                slate_events::projections::catch_up(
                    &pool,
                    slate_events::projections::Projection::AuditLog,
                )
                .await
                .unwrap();
                n += 1;
            }
            n
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<i64> = None;
    // Start below the newest entry that existed, then page down while the
    // writer keeps appending above.
    let top = *existing.last().unwrap() + 1;
    loop {
        let c = cursor.unwrap_or(top);
        let (status, page) = app
            .get_as(&format!("/admin/audit?limit=4&cursor={c}"), Some(&staff))
            .await;
        assert_eq!(status, 200);
        seen.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["seq"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_i64() {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    stop_tx.send(true).unwrap();
    let appended = writer.await.unwrap();
    assert!(appended > 0);
    seen.sort_unstable();
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "an entry came twice");
    assert_eq!(seen, existing, "every entry that existed, exactly once");
}

/// Who read an account's entries, by what: its `StaffRead` events.
async fn reads_of(app: &TestApp, account: Uuid) -> Vec<(String, String)> {
    sqlx::query_as(
        "select payload->>'staff_id', payload->>'what' from events
          where event_type = 'StaffRead' and payload->>'account_id' = $1
          order by global_position",
    )
    .bind(account.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

/// A staff read is recorded on the trail of every account whose entries it
/// shows, not only of the account it asked for: an unfiltered search, an
/// entry's related entries, and an export of the whole log each leave a
/// `StaffRead` on both accounts here. (Recorded against the staff member
/// alone, they left no mark on those accounts' trails.) An export with a
/// filter it does not know is refused, not answered with the whole log.
#[tokio::test]
async fn every_account_whose_entries_staff_see_has_the_read_on_its_trail() {
    let app = spawn_app_with(&[]).await;
    let (alice, _) = key_for(&app).await;
    let (bob, _) = key_for(&app).await;
    app.db.settle_projections().await;
    let (staff_id, staff) = app.staff().await;
    let staff_id = staff_id.to_string();

    let request_id = format!("staff-search-{}", Uuid::now_v7());
    let page: Value = app
        .client
        .get(format!("{}/admin/audit?limit=200", app.address))
        .bearer_auth(&staff)
        .header("x-request-id", &request_id)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    for account in [alice, bob] {
        assert!(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["account_id"] == account.to_string()),
            "{page}"
        );
        assert_eq!(
            reads_of(&app, account).await,
            vec![(staff_id.clone(), "audit:search".to_owned())]
        );
    }
    // Each read names the request that made it: a search by its id finds
    // what it read. (Staff reads recorded the staff member alone.)
    app.db.settle_projections().await;
    let (status, by_request) = app
        .get_as(
            &format!("/admin/audit?request_id={request_id}"),
            Some(&staff),
        )
        .await;
    assert_eq!(status, 200, "{by_request}");
    let mut read: Vec<(String, String)> = by_request["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["account_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    read.sort();
    let mut expected: Vec<(String, String)> = [alice, bob]
        .iter()
        .map(|a| ("staff.read".to_owned(), a.to_string()))
        .collect();
    expected.sort();
    assert!(
        expected.iter().all(|e| read.contains(e)),
        "{read:?} lacks {expected:?}"
    );

    let export = app
        .client
        .get(format!("{}/admin/audit/export?format=csv", app.address))
        .bearer_auth(&staff)
        .send()
        .await
        .unwrap();
    assert_eq!(export.status(), 200);
    let csv = export.text().await.unwrap();
    for account in [alice, bob] {
        assert!(csv.contains(&account.to_string()));
        assert_eq!(
            reads_of(&app, account).await.last(),
            Some(&(staff_id.clone(), "audit:export".to_owned()))
        );
    }
    // Records of staff reads, shown again, are not the accounts' data: a
    // search showing only them records no read of those accounts (each
    // look at them made more of them, and an export walking the log met
    // the records it had just made).
    app.db.settle_projections().await;
    let (status, page) = app
        .get_as("/admin/audit?action=staff.read&limit=200", Some(&staff))
        .await;
    assert_eq!(status, 200);
    assert!(
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["account_id"] == alice.to_string()),
        "{page}"
    );
    for account in [alice, bob] {
        let whats: Vec<String> = reads_of(&app, account)
            .await
            .into_iter()
            .map(|(_, what)| what)
            .collect();
        assert_eq!(whats, ["audit:search", "audit:export"]);
    }

    let refused = app
        .client
        .get(format!("{}/admin/audit/export?actor={alice}", app.address))
        .bearer_auth(&staff)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_query", "{body}");
}

/// A request id is the client's to choose: two accounts sending the same
/// one do not appear in each other's related entries, while one request's
/// own entries still relate. (Any entry with the same id related.) An
/// `?action=` filter is a name or a prefix of names, never a pattern.
#[tokio::test]
async fn a_request_id_shared_by_two_accounts_does_not_relate_their_entries() {
    let app = spawn_app_with(&[]).await;
    let (alice, alice_key) = key_for(&app).await;
    let (bob, bob_key) = key_for(&app).await;
    let shared = format!("shared-{}", Uuid::now_v7());
    for key in [&alice_key, &bob_key] {
        let r = app
            .client
            .post(format!("{}/v1/keys", app.address))
            .bearer_auth(key)
            .header("x-request-id", &shared)
            .json(&json!({"label": "second"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    app.db.settle_projections().await;
    let (_, staff) = app.staff().await;
    let (status, page) = app
        .get_as(&format!("/admin/audit?request_id={shared}"), Some(&staff))
        .await;
    assert_eq!(status, 200, "{page}");
    let entries = page["data"].as_array().unwrap();
    let of = |account: Uuid| {
        entries
            .iter()
            .filter(|e| e["account_id"] == account.to_string())
            .count()
    };
    assert!(of(alice) >= 1 && of(bob) >= 1, "{page}");
    let alices = entries
        .iter()
        .find(|e| e["account_id"] == alice.to_string())
        .unwrap();
    let (status, detail) = app
        .get_as(&format!("/admin/audit/{}", alices["seq"]), Some(&staff))
        .await;
    assert_eq!(status, 200, "{detail}");
    let related = detail["related"].as_array().unwrap();
    assert!(
        related.iter().all(|e| e["account_id"] != bob.to_string()),
        "{detail}"
    );
    assert_eq!(
        related
            .iter()
            .filter(|e| e["request_id"] == shared.as_str())
            .count(),
        of(alice) - 1,
        "{detail}"
    );

    let (status, page) = app.get_as("/admin/audit?action=key", Some(&staff)).await;
    assert_eq!(status, 200, "{page}");
    assert!(page["data"].as_array().unwrap().len() >= 2, "{page}");
    for pattern in ["%", "ke%", "_ey"] {
        let (status, page) = app
            .get_as(&format!("/admin/audit?action={pattern}"), Some(&staff))
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["data"], json!([]), "{pattern}: {page}");
    }
}

/// A time window far back is read through its own entries (the entries
/// written after it are too many to walk past), and pages the same as a
/// recent one: newest first, the cursor going on where the page ended.
#[tokio::test]
async fn a_time_window_far_back_pages_newest_first() {
    let app = spawn_app_with(&[]).await;
    // 12,000 entries a minute apart, the oldest 200 hours ago.
    sqlx::query(
        "insert into audit_entries (position, event_id, at, actor_kind, action, outcome)
         select 1000000 + g, gen_random_uuid(), now() - make_interval(mins => 12000 - g),
                'system', 'bench.entry', 'ok'
           from generate_series(1, 12000) g",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let (_, staff) = app.staff().await;
    let from = (chrono::Utc::now() - chrono::Duration::minutes(11_000)).to_rfc3339();
    let to = (chrono::Utc::now() - chrono::Duration::minutes(10_900)).to_rfc3339();
    let seen: Vec<i64> = pages(
        &app,
        &staff,
        &format!(
            "/admin/audit?from={}&to={}&limit=40",
            urlencode(&from),
            urlencode(&to)
        ),
    )
    .await
    .iter()
    .map(|e| e["seq"].as_i64().unwrap())
    .collect();
    let expected: Vec<i64> = sqlx::query_scalar(
        "select seq from audit_entries where at >= $1 and at < $2 order by seq desc",
    )
    .bind(chrono::DateTime::parse_from_rfc3339(&from).unwrap())
    .bind(chrono::DateTime::parse_from_rfc3339(&to).unwrap())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(expected.len(), 100);
    assert_eq!(seen, expected);
}

/// `?action=` names an action or a family, read through each action's
/// entries in log order: every page, alone or with a narrower filter or a
/// window far back, is what one filter over the whole log gives, newest
/// first, a family never matching a longer name that only starts like it.
#[tokio::test]
async fn an_action_filter_pages_each_of_its_actions_in_log_order() {
    let app = spawn_app_with(&[]).await;
    let account = Uuid::now_v7();
    // 12,000 entries a minute apart, the oldest 200 hours ago: a rare
    // action, two of one family, and one whose name only starts like it.
    sqlx::query(
        "insert into audit_entries (position, event_id, at, actor_kind, action, outcome, account_id)
         select 1000000 + g, gen_random_uuid(), now() - make_interval(mins => 12000 - g),
                'system',
                case when g % 1000 = 7 then 'bench.rare'
                     when g % 3 = 0 then 'bench.a'
                     when g % 3 = 1 then 'bench.b'
                     else 'benchmark.c' end,
                'ok', case when g % 5 = 0 then $1 end
           from generate_series(1, 12000) g",
    )
    .bind(account)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let (_, staff) = app.staff().await;
    let expected = |condition: &'static str| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "select seq from audit_entries where {condition} order by seq desc"
            )))
            .bind(account)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let seqs = |entries: Vec<Value>| -> Vec<i64> {
        entries.iter().map(|e| e["seq"].as_i64().unwrap()).collect()
    };
    let family = seqs(pages(&app, &staff, "/admin/audit?action=bench&limit=500").await);
    let want = expected("left(action, 6) = 'bench.' and $1::uuid is not null").await;
    assert_eq!(want.len(), 8_004);
    assert_eq!(family, want);

    let rare = seqs(pages(&app, &staff, "/admin/audit?action=bench.rare&limit=5").await);
    let want = expected("action = 'bench.rare' and $1::uuid is not null").await;
    assert_eq!(want.len(), 12);
    assert_eq!(rare, want);

    let of_account = seqs(
        pages(
            &app,
            &staff,
            &format!("/admin/audit?action=bench&account={account}&limit=100"),
        )
        .await,
    );
    let want = expected("left(action, 6) = 'bench.' and account_id = $1").await;
    assert_eq!(want.len(), 1_600);
    assert_eq!(of_account, want);

    // A window far back, read through its time index.
    let from = (chrono::Utc::now() - chrono::Duration::minutes(11_000)).to_rfc3339();
    let to = (chrono::Utc::now() - chrono::Duration::minutes(10_900)).to_rfc3339();
    let windowed = seqs(
        pages(
            &app,
            &staff,
            &format!(
                "/admin/audit?action=bench.a&from={}&to={}&limit=7",
                urlencode(&from),
                urlencode(&to)
            ),
        )
        .await,
    );
    let want: Vec<i64> = sqlx::query_scalar(
        "select seq from audit_entries where action = 'bench.a' and at >= $1 and at < $2
          order by seq desc",
    )
    .bind(chrono::DateTime::parse_from_rfc3339(&from).unwrap())
    .bind(chrono::DateTime::parse_from_rfc3339(&to).unwrap())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert!((32..=35).contains(&want.len()), "{}", want.len());
    assert_eq!(windowed, want);

    for name in ["bench.nothing", "benc", "bench.", "chmark"] {
        let (status, page) = app
            .get_as(&format!("/admin/audit?action={name}"), Some(&staff))
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["data"], json!([]), "{name}: {page}");
    }
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

/// A refused key's address is sealed with its owner's data key, and its
/// entry names no account: a staff member who reads it (a search, the
/// entry's page) has the read recorded on the owner's trail, as for any of
/// the owner's data. (It was recorded against the staff member alone.)
#[tokio::test]
async fn a_staff_read_of_a_refused_keys_address_is_on_the_owners_trail() {
    let app = spawn_app_with(&[]).await;
    let (alice, key) = key_for(&app).await;
    let key_id: Uuid = sqlx::query_scalar("select key_id from api_keys where account_id = $1")
        .bind(alice)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let revoked = app
        .client
        .delete(format!("{}/v1/keys/{key_id}", app.address))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert!(revoked.status().is_success(), "{}", revoked.status());
    let (status, _) = app.get_as("/v1/credits", Some(&key)).await;
    assert_eq!(status, 401);
    app.db.settle_projections().await;
    let (staff_id, staff) = app.staff().await;
    let staff_id = staff_id.to_string();
    assert_eq!(reads_of(&app, alice).await, []);

    let (status, page) = app
        .get_as("/admin/audit?action=auth.failed", Some(&staff))
        .await;
    assert_eq!(status, 200, "{page}");
    let entries = page["data"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{page}");
    assert_eq!(entries[0]["account_id"], Value::Null);
    assert_eq!(entries[0]["targets"]["ip"], "127.0.0.1", "{page}");
    assert_eq!(
        reads_of(&app, alice).await,
        [(staff_id.clone(), "audit:search".to_owned())]
    );

    let (status, detail) = app
        .get_as(&format!("/admin/audit/{}", entries[0]["seq"]), Some(&staff))
        .await;
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["cause"]["payload"]["ip"], "127.0.0.1", "{detail}");
    assert_eq!(
        reads_of(&app, alice).await.last(),
        Some(&(staff_id, "audit:entry".to_owned()))
    );
}

/// A request's origin (client address, user agent) is sealed with the data
/// key of the account whose credential made it: a staff member's, for the
/// start of an impersonation. A reader that shows the origin (the JSON
/// export) records a read on that staff member's trail; one that does not
/// (the console's search and account page, the CSV export) leaves it
/// sealed and records none. (Every reader opened it, and each recorded a
/// read of the impersonator's data it did not show.) The start's entry
/// names its request, found by its id. (It recorded no origin at all.)
#[tokio::test]
async fn only_a_reader_that_shows_a_requests_origin_records_a_read_of_its_account() {
    let app = spawn_app_with(&[]).await;
    let (user, _) = key_for(&app).await;
    let (impersonator, impersonator_key) = app.staff().await;
    let (status, i) = app
        .post_json(
            "/admin/impersonations",
            Some(&impersonator_key),
            json!({"account_id": user, "reason": "ticket 7: a look"}),
        )
        .await;
    assert_eq!(status, 201, "{i}");
    app.db.settle_projections().await;
    let request_id: String = sqlx::query_scalar(
        "select request_id from audit_entries where action = 'impersonation.started'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let (reader, reader_key) = app.staff().await;
    let reader = reader.to_string();
    let reads_by_reader = |account: Uuid| {
        let reader = reader.clone();
        let app = &app;
        async move {
            reads_of(app, account)
                .await
                .into_iter()
                .filter(|(staff, _)| *staff == reader)
                .map(|(_, what)| what)
                .collect::<Vec<_>>()
        }
    };
    let get = |path: String| {
        let (client, url, key) = (
            app.client.clone(),
            format!("{}{path}", app.address),
            reader_key.clone(),
        );
        async move {
            let r = client.get(url).bearer_auth(key).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };

    let (status, body) = get(format!("/admin?q={request_id}")).await;
    assert_eq!(status, 200);
    assert!(body.contains("impersonation.started"), "{body}");
    let (status, body) = get(format!("/admin/console/accounts/{user}")).await;
    assert_eq!(status, 200);
    assert!(body.contains("impersonation.started"), "{body}");
    let (status, csv) = get(format!("/admin/audit/export?account={user}&format=csv")).await;
    assert_eq!(status, 200);
    assert!(csv.contains("impersonation.started"), "{csv}");
    assert_eq!(
        reads_by_reader(user).await,
        ["console:search", "console:account", "audit:export"]
    );
    assert_eq!(reads_by_reader(impersonator).await, Vec::<String>::new());

    let (status, jsonl) = get(format!("/admin/audit/export?account={user}")).await;
    assert_eq!(status, 200);
    let started: Value = jsonl
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["action"] == "impersonation.started")
        .unwrap();
    assert_eq!(started["ip"], "127.0.0.1", "{started}");
    assert_eq!(reads_by_reader(impersonator).await, ["audit:export"]);
}

/// A search by target (`/admin/audit?target=`, what the console's search
/// asks for every query) finds its entries through
/// `audit_entries_target_values_idx`, whatever the target's key. (It read
/// the table newest first, all of it for an id found nowhere: 5.8 s at 2 M
/// entries on the 2026-12-06 machine, 0.07 ms with the index.)
#[tokio::test]
async fn a_search_by_target_finds_its_entries_through_the_index() {
    let app = spawn_app_with(&[]).await;
    sqlx::query(
        "insert into audit_entries (position, event_id, at, actor_kind, action, targets, outcome)
         select 1000000000 + i, gen_random_uuid(), now(), 'user', 'generation.requested',
                jsonb_build_object('generation', 'gen-' || i, 'amount', 5), 'ok'
           from generate_series(1, 20000) i",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    sqlx::query("analyze audit_entries")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let scans = || async {
        sqlx::query_scalar::<_, i64>(
            "select idx_scan from pg_stat_user_indexes
              where indexrelname = 'audit_entries_target_values_idx'",
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
    };
    let before = scans().await;
    let (_, staff) = app.staff().await;
    for (target, found) in [("gen-17", 1), ("gen-nowhere", 0)] {
        let (status, page) = app
            .get_as(&format!("/admin/audit?target={target}"), Some(&staff))
            .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["data"].as_array().unwrap().len(), found, "{page}");
    }
    // PostgreSQL reports a backend's index use within a second or so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while scans().await < before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the index was not used"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn exports_stream_json_lines_or_csv() {
    let app = spawn_app_with(&[]).await;
    let (account, _) = key_for(&app).await;
    for _ in 0..3 {
        crate::credits::grant(
            &mut *app.db.conn().await,
            account,
            1,
            slate_events::catalog::GrantSource::Promotion,
            None,
        )
        .await;
    }
    app.db.settle_projections().await;
    let (_, staff) = app.staff().await;
    let get = |q: String| {
        let (client, url, staff) = (
            app.client.clone(),
            format!("{}/admin/audit/export?{q}", app.address),
            staff.clone(),
        );
        async move { client.get(url).bearer_auth(staff).send().await.unwrap() }
    };
    let r = get(format!("account={account}")).await;
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 5, "{text}"); // account, key, three grants
    let r = get(format!("account={account}&format=csv")).await;
    let csv = r.text().await.unwrap();
    assert!(csv.starts_with("seq,at,actor_kind"));
    assert_eq!(csv.lines().count(), lines.len() + 1);
    assert_eq!(get("format=xml".into()).await.status().as_u16(), 422);
}

#[tokio::test]
async fn entries_are_dropped_at_eighteen_months_and_not_before_while_the_events_stay() {
    let app = spawn_app_with(&[]).await;
    let (account, _) = key_for(&app).await;
    crate::credits::grant(
        &mut *app.db.conn().await,
        account,
        5,
        slate_events::catalog::GrantSource::Promotion,
        None,
    )
    .await;
    app.db.settle_projections().await;
    let count = |table: &'static str| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
                "select count(*) from {table}"
            )))
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let (entries, events) = (count("audit_entries").await, count("events").await);
    assert!(entries >= 3);
    let now = chrono::Utc::now();
    let early = slate_workers::sweeper::sweep(
        &app.db.pool,
        now + chrono::Months::new(18) - chrono::Duration::days(1),
    )
    .await
    .unwrap();
    assert_eq!(early.audit_entries_dropped, 0);
    let late = slate_workers::sweeper::sweep(
        &app.db.pool,
        now + chrono::Months::new(18) + chrono::Duration::days(1),
    )
    .await
    .unwrap();
    assert_eq!(late.audit_entries_dropped as i64, entries);
    assert_eq!(count("audit_entries").await, 0);
    assert_eq!(count("events").await, events, "the events stay");
    // A rebuild keeps nothing past the cutoff either, so verify still agrees.
    let report =
        slate_events::projections::verify(&app.db.pool, slate_events::projections::Projection::ALL)
            .await
            .unwrap();
    assert!(report.is_clean(), "{report:#?}");
}

#[tokio::test]
async fn slate_audit_query_and_export_work_from_the_command_line() {
    let app = spawn_app_with(&[]).await;
    let (account, _) = key_for(&app).await;
    crate::credits::grant(
        &mut *app.db.conn().await,
        account,
        5,
        slate_events::catalog::GrantSource::Promotion,
        None,
    )
    .await;
    app.db.settle_projections().await;
    let bin = env!("CARGO_BIN_EXE_slate");
    let out = std::process::Command::new(bin)
        .args(["audit", "query", "--account", &account.to_string()])
        .env("DATABASE_URL", &app.db.url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("credits.granted") && text.contains("key.created"),
        "{text}"
    );
    let file = std::env::temp_dir().join(format!("audit-{}.csv", Uuid::new_v4()));
    let out = std::process::Command::new(bin)
        .args([
            "audit",
            "export",
            "--format",
            "csv",
            "--account",
            &account.to_string(),
            "--out",
        ])
        .arg(&file)
        .env("DATABASE_URL", &app.db.url)
        .output()
        .unwrap();
    assert!(out.status.success());
    let csv = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(csv.starts_with("seq,at,"));
    assert_eq!(csv.lines().count(), 4, "{csv}"); // header, account, key, grant
}

#[tokio::test]
async fn the_staff_console_searches_follows_entries_and_replays_a_stripe_event() {
    let app = crate::stripe::stripe_app().await;
    let mut conn = app.db.conn().await;
    let account = slate_events::accounts::create_account(
        &mut conn,
        "<b>mallory</b>@example.com",
        false,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    drop(conn);
    let run = Uuid::new_v4().simple().to_string()[..10].to_owned();
    app.deliver(&crate::stripe::fixture(
        "01_checkout_session_completed_pack",
        account,
        &run,
    ))
    .await;
    app.process_stripe().await;
    app.db.settle_projections().await;
    let (_, staff) = app.staff().await;
    let html = |path: String, key: Option<String>| {
        let (client, url) = (app.client.clone(), format!("{}{path}", app.address));
        async move {
            let mut req = client.get(url);
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    // Signed out: a sign-in page, not data.
    let (status, body) = html("/admin".into(), None).await;
    assert_eq!(status, 401);
    assert!(body.contains("/v1/auth/oidc/start"));

    let (status, body) = html("/admin?q=mallory".into(), Some(staff.clone())).await;
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("/admin/console/accounts/{account}")),
        "{body}"
    );
    assert!(
        body.contains("&lt;b&gt;mallory&lt;/b&gt;") && !body.contains("<b>mallory</b>"),
        "escaped"
    );
    // The account shown was read, and its own trail says by whom.
    let read_by: Vec<String> = sqlx::query_scalar(
        "select payload->>'staff_id' from events
          where event_type = 'StaffRead' and payload->>'what' = 'console:search'
            and payload->>'account_id' = $1",
    )
    .bind(account.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(read_by.len(), 1, "{read_by:?}");
    assert_ne!(read_by[0], account.to_string());
    // Search text is text: `%` is no wildcard (it matched every account,
    // and recorded a staff read in each one's trail).
    let (status, body) = html("/admin?q=%25".into(), Some(staff.clone())).await;
    assert_eq!(status, 200);
    assert!(body.contains("No account matches."), "{body}");
    // Nor does a part too short to name anyone (`@` matched every account
    // with an email), while a whole email, however short, still finds its
    // account.
    for q in ["%40", ".", "b%3E%40"] {
        let (status, body) = html(format!("/admin?q={q}"), Some(staff.clone())).await;
        assert_eq!(status, 200);
        assert!(body.contains("No account matches."), "{q}: {body}");
    }
    let short = slate_events::accounts::create_account(
        &mut *app.db.conn().await,
        "q@z",
        false,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    let (status, body) = html("/admin?q=Q%40Z".into(), Some(staff.clone())).await;
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("/admin/console/accounts/{short}"))
            && !body.contains(&format!("/admin/console/accounts/{account}")),
        "{body}"
    );

    let (status, body) = html(
        format!("/admin/console/accounts/{account}"),
        Some(staff.clone()),
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("available <b>500</b>"), "{body}");
    assert!(body.contains("CreditsGranted") && body.contains(&format!("evt_{run}_01")));

    // Follow an entry to its causing event and related entries.
    let seq: i64 =
        sqlx::query_scalar("select seq from audit_entries where action = 'credits.granted'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let (status, body) = html(format!("/admin/console/audit/{seq}"), Some(staff.clone())).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("Causing event") && body.contains("stripe.event_received"),
        "{body}"
    );

    // Replay the Stripe event from there: audited, and changes nothing.
    assert_eq!(
        crate::stripe::console_replay(&app, &staff, &format!("evt_{run}_01")).await,
        200
    );
    let replays: i64 =
        sqlx::query_scalar("select count(*) from events where event_type = 'StripeEventReplayed'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(replays, 1);
    let b = slate_events::credits::balance(&mut *app.db.conn().await, account)
        .await
        .unwrap();
    assert_eq!(b.available, 500);
    // Non-staff get the sign-in page, never the data.
    let (_, user_key) = key_for(&app).await;
    let (status, body) = html(format!("/admin/console/accounts/{account}"), Some(user_key)).await;
    assert_eq!(status, 401);
    assert!(!body.contains("mallory"));
}
