//! The privacy promises after a deletion: the purge 30 days on (clock
//! injected) against a fake Stripe API and a fake email API (Resend's
//! shape), crash-and-resume, crypto-shredding of sealed fields, and the books
//! of the whole system unchanged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use slate_events::projections::{self, Projection};
use slate_events::vault::{self, Opened};
use slate_workers::email::{Mailer, MailerSettings};
use slate_workers::purge::{self, Outcome, Purger};
use uuid::Uuid;
use wiremock::matchers::{header, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::http::{TestApp, spawn_app_with};

/// Stripe's subscription endpoints for one subscription, with state: it is
/// active until a `DELETE` cancels it.
struct FakeSubscription {
    object: Value,
    canceled: Arc<AtomicBool>,
}

impl Respond for FakeSubscription {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if request.method.as_str() == "DELETE" {
            self.canceled.store(true, Ordering::SeqCst);
        }
        let mut sub = self.object.clone();
        if self.canceled.load(Ordering::SeqCst) {
            sub["status"] = "canceled".into();
            sub["canceled_at"] = chrono::Utc::now().timestamp().into();
            sub["ended_at"] = chrono::Utc::now().timestamp().into();
        }
        ResponseTemplate::new(200).set_body_json(sub)
    }
}

async fn fake_stripe(subscription: Value) -> MockServer {
    let server = MockServer::start().await;
    let id = subscription["id"].as_str().unwrap().to_owned();
    Mock::given(path(format!("/v1/subscriptions/{id}")))
        .and(header("authorization", "Bearer sk_test_purge"))
        .respond_with(FakeSubscription {
            object: subscription,
            canceled: Arc::new(AtomicBool::new(false)),
        })
        .mount(&server)
        .await;
    server
}

async fn fake_email_api() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/emails"))
        .and(header("authorization", "Bearer re_test_key"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "4ef9a417-02e9-4d39-ad75-9611e0fcc33c"})),
        )
        .mount(&server)
        .await;
    server
}

fn mailer(server: &MockServer) -> Mailer {
    Mailer::new(MailerSettings {
        api_base: server.uri(),
        api_key: "re_test_key".into(),
        from: "Slate <no-reply@slate.test>".into(),
    })
    .unwrap()
}

fn purger(app: &TestApp, stripe: &MockServer, email: &MockServer) -> Purger {
    let config = slate::config::Config::from_lookup(|k| match k {
        "STRIPE_API_KEY" => Some("sk_test_purge".into()),
        "STRIPE_API_BASE" => Some(stripe.uri()),
        _ => None,
    })
    .unwrap();
    Purger {
        pool: app.db.pool.clone(),
        storage: crate::generations::storage(),
        mailer: Some(mailer(email)),
        stripe: config
            .stripe_client()
            .unwrap()
            .map(slate::stripe::billing::subscription_canceller),
        crash_after: None,
    }
}

/// Sums over every account: what a purge must not change.
async fn books(app: &TestApp) -> Value {
    sqlx::query_scalar(
        "select jsonb_build_object(
            'granted', (select sum(total_granted) from credit_accounts),
            'captured', (select sum(total_captured) from credit_accounts),
            'available', (select sum(available) from credit_accounts),
            'reserved', (select sum(reserved) from credit_accounts),
            'ledger', (select jsonb_build_array(count(*), sum(delta_available), sum(delta_reserved))
                         from credit_ledger_entries),
            'buckets', (select count(*) from credit_buckets),
            'subscriptions', (select count(*) from stripe_subscriptions))",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap()
}

async fn count(app: &TestApp, sql: &'static str, account: Uuid) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(account)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn thirty_days_after_deletion_the_purge_erases_everything_personal_once_even_when_rerun() {
    let app = crate::stripe::stripe_app().await;
    let (alice, alice_key) = crate::billing::key_for(&app).await;
    let (bob, bob_key) = crate::billing::key_for(&app).await;
    let alice_email: String =
        sqlx::query_scalar("select email from accounts where account_id = $1")
            .bind(alice)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();

    // Alice subscribes (Stripe events shaped like the real ones), has
    // credits and makes something; so does Bob.
    let (run, subscription) = subscribe(&app, alice).await;
    let stripe = fake_stripe(subscription).await;
    let email_api = fake_email_api().await;
    for (account, key) in [(alice, &alice_key), (bob, &bob_key)] {
        app.grant_and_submit(
            account,
            key,
            20,
            json!({"kind": "script", "provider": "local", "prompt": format!("a marble whale for {account}")}),
        )
        .await;
    }
    app.run_generations().await;
    // She paid an invoice, and lost a dispute of its charge (a dispute
    // names the charge and the payment intent, not the customer).
    for name in ["07_invoice_paid_4", "11_charge_dispute_closed_lost"] {
        let (status, _) = app
            .deliver(&crate::stripe::fixture(name, alice, &run))
            .await;
        assert_eq!(status, 200);
    }
    app.process_stripe().await;
    let storage = crate::generations::storage();
    assert!(
        !storage
            .list_prefix(&format!("users/{alice}/"))
            .await
            .unwrap()
            .is_empty()
    );

    // Alice deletes her account: the "scheduled" email is queued with it.
    assert_eq!(app.delete_account(&alice_key).await, 202);
    // Her key, tried during the grace period, is refused: the record names
    // it and holds the address sealed with her data key.
    let alice_prefix = slate_events::access::public_prefix(&alice_key).map(str::to_owned);
    assert_eq!(
        refused_key(&app, &alice_key).await,
        (alice_prefix.clone(), Some(alice))
    );
    // Her prefix with another secret is someone else: named, the address
    // kept as it is.
    let last = if alice_key.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &alice_key[..alice_key.len() - 1]);
    assert_eq!(
        refused_key(&app, &forged).await,
        (alice_prefix.clone(), None)
    );
    let queued: Vec<Vec<u8>> =
        sqlx::query_scalar("select job from apalis.jobs where job_type = 'slate.email'")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(queued.len(), 1);
    let job: slate_workers::email::EmailJob = serde_json::from_slice(&queued[0]).unwrap();
    assert!(
        !String::from_utf8_lossy(&queued[0]).contains(&alice_email),
        "jobs carry ids, not addresses"
    );
    let sent = slate_workers::email::deliver(
        &app.db.pool,
        Some(&mailer(&email_api)),
        job.account_id,
        job.template,
        &job.key.to_string(),
    )
    .await
    .unwrap();
    assert!(matches!(sent, slate_workers::email::Outcome::Sent(_)));
    let scheduled = email_api.received_requests().await.unwrap();
    assert_eq!(scheduled.len(), 1);
    let body: Value = scheduled[0].body_json().unwrap();
    assert_eq!(body["to"], json!([alice_email]));
    assert!(body["subject"].as_str().unwrap().contains("scheduled"));
    assert!(scheduled[0].headers.get("idempotency-key").is_some());

    app.db.settle_projections().await;
    let books_before = books(&app).await;
    // Staff see where each submission came from; the log holds the address
    // sealed with the key of the account that made the request.
    let (_, staff_key) = app.staff().await;
    let submitted = |account: Uuid| {
        let app = &app;
        async move {
            let seq: i64 = sqlx::query_scalar(
                "select seq from audit_entries where account_id = $1 and action = 'generation.requested'",
            )
            .bind(account)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
            seq
        }
    };
    let (alice_submitted, bob_submitted) = (submitted(alice).await, submitted(bob).await);
    for seq in [alice_submitted, bob_submitted] {
        let (status, entry) = app
            .get_as(&format!("/admin/audit/{seq}"), Some(&staff_key))
            .await;
        assert_eq!(status, 200, "{entry}");
        assert_eq!(entry["entry"]["ip"], "127.0.0.1", "{entry}");
        assert_eq!(entry["cause"]["metadata"]["ip"], "127.0.0.1", "{entry}");
    }
    let stored: Vec<String> = sqlx::query_scalar(
        "select metadata->>'ip' from events
          where metadata->'actor'->>'account_id' = $1 and metadata ? 'ip'
         union all
         select ip from audit_entries where actor_id = $1 and ip is not null",
    )
    .bind(alice.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert!(stored.len() >= 2, "{stored:?}");
    assert!(
        stored
            .iter()
            .all(|ip| vault::is_sealed(ip) && ip.contains(&alice.to_string())),
        "{stored:?}"
    );
    let p = purger(&app, &stripe, &email_api);
    let now = chrono::Utc::now();
    assert_eq!(
        purge::purge(&p, alice, now).await.unwrap(),
        Outcome::NotDue,
        "nothing happens within the grace period"
    );
    assert_eq!(
        slate_workers::sweeper::sweep(&app.db.pool, now)
            .await
            .unwrap()
            .purges_scheduled,
        0
    );
    let later = now + chrono::Duration::days(31);
    let report = slate_workers::sweeper::sweep(&app.db.pool, later)
        .await
        .unwrap();
    assert_eq!(
        report.purges_scheduled, 1,
        "the maintenance sweep schedules it"
    );
    assert_eq!(
        slate_workers::sweeper::sweep(&app.db.pool, later)
            .await
            .unwrap()
            .purges_scheduled,
        0,
        "once"
    );

    // The first run dies right after Stripe canceled, before recording it.
    let crashing = Purger {
        crash_after: Some("stripe"),
        ..p.clone()
    };
    assert!(purge::purge(&crashing, alice, later).await.is_err());
    // The re-run finds the subscription canceled and finishes.
    assert_eq!(
        purge::purge(&p, alice, later).await.unwrap(),
        Outcome::Purged
    );
    assert_eq!(
        purge::purge(&p, alice, later).await.unwrap(),
        Outcome::AlreadyPurged
    );
    let to_stripe = stripe.received_requests().await.unwrap();
    let cancels: Vec<_> = to_stripe
        .iter()
        .filter(|r| r.method.as_str() == "DELETE")
        .collect();
    assert_eq!(cancels.len(), 1, "the subscription is canceled once");
    assert_eq!(
        cancels[0].headers.get("idempotency-key").unwrap(),
        &format!("slate-purge-cancel-sub_{run}")
    );

    // Gone: media, prompts, sessions, keys, generations, the email.
    assert!(
        storage
            .list_prefix(&format!("users/{alice}/"))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        !storage
            .list_prefix(&format!("users/{bob}/"))
            .await
            .unwrap()
            .is_empty()
    );
    for sql in [
        "select count(*) from api_keys where account_id = $1",
        "select count(*) from sessions where account_id = $1",
        "select count(*) from generations where account_id = $1",
        "select count(*) from accounts where account_id = $1 and email is not null",
        "select count(*) from idempotency_keys where account_id = $1",
    ] {
        assert_eq!(count(&app, sql, alice).await, 0, "{sql}");
    }
    assert_eq!(
        count(
            &app,
            "select count(*) from generations where account_id = $1",
            bob
        )
        .await,
        1
    );
    assert_eq!(
        sqlx::query_scalar::<_, i64>(
            "select count(*) from generation_inputs where prompt is not null"
        )
        .fetch_one(&app.db.pool)
        .await
        .unwrap(),
        1,
        "only Bob's prompt is left"
    );
    // Staff can still find the purged account by its id (the console's
    // search read its erased email as text, and answered 500).
    let (_, staff_key) = app.staff().await;
    let r = app
        .client
        .get(format!("{}/admin?q={alice}", app.address))
        .bearer_auth(&staff_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let page = r.text().await.unwrap();
    assert!(
        page.contains(&format!("/admin/console/accounts/{alice}")) && page.contains("[erased]"),
        "{page}"
    );

    // The log still holds Alice's email, sealed, and it no longer opens.
    let sealed: String = sqlx::query_scalar(
        "select payload->>'email' from events where event_type = 'AccountCreated' and payload->>'account_id' = $1",
    )
    .bind(alice.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(vault::is_sealed(&sealed) && !sealed.contains(&alice_email));
    let mut conn = app.db.conn().await;
    assert_eq!(
        vault::open(&mut conn, &sealed).await.unwrap(),
        Opened::Erased
    );
    drop(conn);

    // The farewell went out once, and every step is on the record.
    let emails = email_api.received_requests().await.unwrap();
    assert_eq!(emails.len(), 2);
    assert!(
        emails[1].body_json::<Value>().unwrap()["subject"]
            .as_str()
            .unwrap()
            .contains("deleted")
    );
    let steps: Vec<String> = sqlx::query_scalar(
        "select event_type || coalesce(':' || (payload->>'step'), '') from events
          where stream_id = 'account-' || $1 and event_type in ('AccountPurgeStepCompleted', 'AccountPurged', 'EmailSent')
          order by global_position",
    )
    .bind(alice.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        steps,
        [
            "EmailSent",
            "AccountPurgeStepCompleted:stripe",
            "AccountPurgeStepCompleted:storage",
            "EmailSent",
            "AccountPurgeStepCompleted:farewell_email",
            "AccountPurged"
        ]
    );

    // A refund Stripe reports after the purge is redacted as it is
    // processed.
    let (status, _) = app
        .deliver(&crate::stripe::fixture(
            "09_charge_refunded_partial",
            alice,
            &run,
        ))
        .await;
    assert_eq!(status, 200);
    app.process_stripe().await;

    // Stripe's copies of her name, email, card and receipts are redacted in
    // the mirror, and replaying every mirrored event still decides the same.
    let mirrored: Vec<(String, String)> =
        sqlx::query_as("select stripe_event_id, raw from stripe_events")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(mirrored.len(), 5);
    for (id, raw) in &mirrored {
        for personal in [
            "ada@example.com",
            "Ada Lovelace",
            "4242",
            "Xt5EWLLDS7FJjR1c",
            "pay.stripe.com",
        ] {
            assert!(!raw.contains(personal), "{personal} in {raw}");
        }
        // Effects are keyed: a replay changes nothing (the books below).
        slate_events::stripe::process(&app.db.pool, &crate::stripe::catalog(), id, true)
            .await
            .unwrap_or_else(|e| panic!("replaying {id} after the purge: {e}"));
    }

    // The books of the whole system are unchanged, and the projections
    // rebuilt from the log agree with the live tables.
    app.db.settle_projections().await;
    assert_eq!(books(&app).await, books_before);
    let report = projections::verify(&app.db.pool, Projection::ALL)
        .await
        .unwrap();
    assert!(report.is_clean(), "{report:?}");

    // Staff see "erased" where the email was.
    let (_, staff_key) = app.staff().await;
    let seq: i64 = sqlx::query_scalar(
        "select seq from audit_entries where account_id = $1 and action = 'account.created'",
    )
    .bind(alice)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let (status, entry) = app
        .get_as(&format!("/admin/audit/{seq}"), Some(&staff_key))
        .await;
    assert_eq!(status, 200, "{entry}");
    assert_eq!(entry["cause"]["payload"]["email"], vault::ERASED);
    // Where her requests came from is erased with her key; Bob's is not.
    for (seq, ip) in [
        (alice_submitted, vault::ERASED),
        (bob_submitted, "127.0.0.1"),
    ] {
        let (status, entry) = app
            .get_as(&format!("/admin/audit/{seq}"), Some(&staff_key))
            .await;
        assert_eq!(status, 200, "{entry}");
        assert_eq!(entry["entry"]["ip"], ip, "{entry}");
        assert_eq!(entry["cause"]["metadata"]["ip"], ip, "{entry}");
    }
    let (_, page) = app
        .get_as(
            &format!("/admin/audit?account={alice}&action=generation"),
            Some(&staff_key),
        )
        .await;
    let ips: Vec<&Value> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor_kind"] == "user")
        .map(|e| &e["ip"])
        .collect();
    assert!(
        !ips.is_empty() && ips.iter().all(|ip| *ip == vault::ERASED),
        "{page}"
    );
    let (_, page) = app
        .get_as("/admin/audit?action=auth.failed", Some(&staff_key))
        .await;
    let ips: Vec<&Value> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["targets"]["key_prefix"] == json!(alice_prefix))
        .map(|e| &e["targets"]["ip"])
        .collect();
    assert_eq!(ips, ["127.0.0.1", vault::ERASED], "{page}");
    // Tried after the purge, her key is no longer on file: the record does
    // not name it (the log's `ApiKeyCreated` would tie the address to her).
    assert_eq!(refused_key(&app, &alice_key).await, (None, None));

    // A late event whose processing fails (a refund without its amount) is
    // redacted all the same.
    let mut broken: Value = serde_json::from_str(&crate::stripe::fixture(
        "09_charge_refunded_partial",
        alice,
        &run,
    ))
    .unwrap();
    broken["id"] = format!("evt_{run}_broken").into();
    broken["data"]["object"]["amount"] = Value::Null;
    assert_eq!(app.deliver(&broken.to_string()).await.0, 200);
    let id = format!("evt_{run}_broken");
    assert!(
        slate_events::stripe::process(&app.db.pool, &crate::stripe::catalog(), &id, false)
            .await
            .is_err()
    );
    let raw: String =
        sqlx::query_scalar("select raw from stripe_events where stripe_event_id = $1")
            .bind(&id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert!(!raw.contains("ada@example.com"), "{raw}");
}

/// Present `key`, expect a 401, and read what its record says: the key's
/// prefix, and the account whose data key sealed the client's address
/// (None: the address is plain, `127.0.0.1`).
async fn refused_key(app: &TestApp, key: &str) -> (Option<String>, Option<Uuid>) {
    let r = app
        .client
        .get(format!("{}/v1/credits", app.address))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let payload: Value = sqlx::query_scalar(
        "select payload from events where event_type = 'AuthenticationFailed'
          order by global_position desc limit 1",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    let ip = payload["ip"].as_str().unwrap();
    let sealer = vault::is_sealed(ip).then(|| {
        ip.trim_start_matches("sealed:v1:")
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    });
    if sealer.is_none() {
        assert_eq!(ip, "127.0.0.1");
    }
    (payload["key_prefix"].as_str().map(str::to_owned), sealer)
}

/// An export opens only what its own account's key sealed: a string the
/// account wrote itself (a generation's parameters) that is another
/// account's sealed value, copied from a dump say, is not opened for it.
#[tokio::test]
async fn an_export_opens_only_what_the_accounts_own_key_sealed() {
    let app = spawn_app_with(&[]).await;
    let (alice, alice_key) = crate::billing::key_for(&app).await;
    let (bob, _) = crate::billing::key_for(&app).await;
    let (bob_email, bob_sealed): (String, String) = sqlx::query_as(
        "select a.email, e.payload->>'email' from accounts a
           join events e on e.event_type = 'AccountCreated' and e.payload->>'account_id' = a.account_id::text
          where a.account_id = $1",
    )
    .bind(bob)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(vault::is_sealed(&bob_sealed));
    app.grant_and_submit(
        alice,
        &alice_key,
        5,
        json!({"kind": "script", "provider": "local", "prompt": "a quiet harbour",
               "parameters": {"note": bob_sealed}}),
    )
    .await;
    let export = app.export(&alice_key).await;
    assert!(
        export.contains("a quiet harbour"),
        "her own prompt is opened"
    );
    assert!(!export.contains(&bob_email), "{export}");
}

/// The purge finds an account's mirrored Stripe events by the ids they name
/// (`refs`, written by their processing and by the sweep), and still scans
/// the rows not mapped yet (written before `refs` existed); it maps what it
/// redacts and touches no one else's.
#[tokio::test]
async fn the_purge_finds_mirrored_events_by_their_ids_and_scans_rows_not_mapped_yet() {
    let app = crate::stripe::stripe_app().await;
    let (alice, _) = crate::billing::key_for(&app).await;
    let (bob, _) = crate::billing::key_for(&app).await;
    let (alice_run, _) = subscribe(&app, alice).await;
    let (bob_run, _) = subscribe(&app, bob).await;
    for (account, run) in [(alice, &alice_run), (bob, &bob_run)] {
        for name in ["07_invoice_paid_4", "11_charge_dispute_closed_lost"] {
            let (status, _) = app
                .deliver(&crate::stripe::fixture(name, account, run))
                .await;
            assert_eq!(status, 200);
        }
    }
    app.process_stripe().await;
    let mirror = || async {
        let rows: Vec<(String, String, Option<Vec<String>>)> = sqlx::query_as(
            "select stripe_event_id, raw, refs from stripe_events order by stripe_event_id",
        )
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
        rows
    };
    // Processing wrote each event's ids; the dispute names her only by its
    // payment intent (what her credits were bought with).
    let processed = mirror().await;
    assert_eq!(processed.len(), 8);
    for (id, raw, refs) in &processed {
        let refs = refs.as_ref().unwrap_or_else(|| panic!("{id} not mapped"));
        let body: Value = serde_json::from_str(raw).unwrap();
        assert_eq!(refs, &slate_events::stripe::refs_of(&body), "{id}");
        assert!(!refs.is_empty(), "{id}");
    }
    let refs_of = |id: &str| processed.iter().find(|r| r.0 == id).unwrap().2.clone();
    let alice_dispute = format!("evt_{alice_run}_11");
    assert_eq!(
        refs_of(&alice_dispute).unwrap(),
        [format!("pi_{alice_run}_in4")]
    );

    // Rows written some other way, each holding her email:
    let insert = |id: String, raw: String, refs: Option<Vec<String>>| {
        let app = &app;
        async move {
            sqlx::query(
                "insert into stripe_events (stripe_event_id, event_type, livemode, created, raw,
                                            source, parsed, status, refs)
                 values ($1, 'customer.updated', false, now(), $2, 'webhook', true, 'ignored', $3)",
            )
            .bind(&id)
            .bind(raw)
            .bind(refs)
            .execute(&app.db.pool)
            .await
            .unwrap();
            id
        }
    };
    let body = |id: &str, object: Value| {
        json!({"id": id, "object": "event", "type": "customer.updated",
               "data": {"object": object}})
        .to_string()
    };
    // - one naming her account only (in its metadata), not mapped yet;
    let by_account = format!("evt_{alice_run}_by_account");
    let by_account = insert(
        by_account.clone(),
        body(
            &by_account,
            json!({"object": "customer", "email": "ada@example.com",
                   "metadata": {"account_id": alice.to_string()}}),
        ),
        None,
    )
    .await;
    // - one whose body is not JSON, naming her customer, not mapped yet;
    let broken = insert(
        format!("evt_{alice_run}_broken"),
        format!(r#"{{"data": {{"object": {{"customer": "cus_{alice_run}", "email": "ada@example.com", "n": 1e999"#),
        None,
    )
    .await;
    // - one naming a customer id of hers of a kind `refs` does not hold,
    //   mapped already (found by a scan of every body).
    let odd_customer = format!("acct_legacy_{alice_run}");
    sqlx::query(
        "insert into stripe_customers (customer_id, account_id, linked_at) values ($1, $2, now())",
    )
    .bind(&odd_customer)
    .bind(alice)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let odd_event = format!("evt_{alice_run}_odd");
    let odd_event = insert(
        odd_event.clone(),
        body(
            &odd_event,
            json!({"id": odd_customer, "object": "customer", "email": "ada@example.com"}),
        ),
        Some(vec![]),
    )
    .await;
    // The sweep maps the first two: her account's id, and the broken
    // body's quoted ids.
    let report = slate_workers::sweeper::sweep(&app.db.pool, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(report.stripe_events_mapped, 2);
    let refs: Vec<(String, Vec<String>)> =
        sqlx::query_as("select stripe_event_id, refs from stripe_events where stripe_event_id = any($1) order by stripe_event_id")
            .bind([&broken, &by_account])
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        refs,
        [
            (broken.clone(), vec![format!("cus_{alice_run}")]),
            (by_account.clone(), vec![alice.to_string()]),
        ]
    );

    // As if written before `refs` existed: her invoice and Bob's. Her
    // dispute stays mapped (found through its payment intent).
    let unmapped = [format!("evt_{alice_run}_07"), format!("evt_{bob_run}_07")];
    sqlx::query("update stripe_events set refs = null where stripe_event_id = any($1)")
        .bind(&unmapped[..])
        .execute(&app.db.pool)
        .await
        .unwrap();
    let mut tx = app.db.pool.begin().await.unwrap();
    let redacted = slate_events::stripe::redact_personal_details(&mut tx, alice)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Her subscription's event names her customer and holds nothing
    // personal.
    assert_eq!(
        redacted, 6,
        "her checkout, invoice, dispute, and the three rows above"
    );
    for (id, raw, refs) in mirror().await {
        if id.contains(&alice_run) {
            assert!(!raw.contains("ada@example.com"), "{id}: {raw}");
            assert!(refs.is_some(), "{id}");
            if id == broken {
                assert_eq!(raw, "{}", "unreadable: dropped whole");
            } else if ![&by_account, &odd_event].contains(&&id) {
                // Mapped from the redacted body: the same ids.
                assert_eq!(refs, refs_of(&id), "{id}");
            }
        } else {
            // Bob's are untouched, his unmapped invoice too.
            let before = &processed.iter().find(|r| r.0 == id).unwrap().1;
            assert_eq!(&raw, before, "{id}");
            assert_eq!(refs.is_none(), id == unmapped[1], "{id}");
        }
    }
    // The sweep maps the rest, as processing would have.
    let report = slate_workers::sweeper::sweep(&app.db.pool, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(report.stripe_events_mapped, 1);
    let after = mirror().await;
    let bob_invoice = after.iter().find(|r| r.0 == unmapped[1]).unwrap();
    assert_eq!(bob_invoice.2, refs_of(&unmapped[1]));
}

/// The sweep maps the mirror's old rows a batch at a time until none is left
/// or its time is up: one batch at least, and as many as there are without a
/// limit of batches. A row waiting for its processing is left to it.
#[tokio::test]
async fn the_sweeps_mapping_goes_on_in_batches_until_no_row_is_left() {
    let db = crate::harness::TestDb::new().await;
    sqlx::query(
        "insert into stripe_events (stripe_event_id, event_type, livemode, created, raw,
                                    source, parsed, status)
         select 'evt_old_' || g, 'customer.updated', false, now(),
                '{\"id\": \"evt_old_' || g || '\", \"data\": {\"object\": {\"id\": \"cus_old_' || g || '\"}}}',
                'webhook', true, 'ignored'
           from generate_series(1, 2500) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into stripe_events (stripe_event_id, event_type, livemode, created, raw,
                                    source, parsed, status, received_at)
         values ('evt_waiting', 'customer.updated', false, now(),
                 '{\"id\": \"evt_waiting\", \"data\": {\"object\": {\"id\": \"cus_waiting\"}}}',
                 'webhook', true, 'pending', now() - interval '1 day')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let map = |budget| slate_workers::sweeper::map_stripe_events(&db.pool, budget);
    assert_eq!(map(std::time::Duration::ZERO).await.unwrap(), 1_000);
    assert_eq!(map(std::time::Duration::MAX).await.unwrap(), 1_500);
    assert_eq!(map(std::time::Duration::MAX).await.unwrap(), 0);
    let unmapped: Vec<String> = sqlx::query_scalar(
        "select stripe_event_id from stripe_events
          where refs is distinct from array['cus_old_' || substr(stripe_event_id, 9)]",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(unmapped, ["evt_waiting"]);
}

/// An email API that refuses the farewell (here 422: an address it will
/// not send to) does not stop the purge: everything personal is erased and
/// the step says why no farewell went out. (The refusal ended every run
/// before the erase, for good.) A transient failure still retries it.
/// An app with one account, alice, deleted (202), and an email API fake
/// with nothing mounted yet.
async fn deleted_account() -> (TestApp, Uuid, MockServer) {
    let app = spawn_app_with(&[]).await;
    let (alice, alice_key) = crate::billing::key_for(&app).await;
    assert_eq!(app.delete_account(&alice_key).await, 202);
    (app, alice, MockServer::start().await)
}

/// A purger whose email API accepts the farewell, with a Stripe API that
/// has nothing to cancel (keep the server while the purger is used).
async fn farewell_purger(app: &TestApp, email_api: &MockServer) -> (Purger, MockServer) {
    Mock::given(method("POST"))
        .and(path("/emails"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "em_farewell"})))
        .mount(email_api)
        .await;
    let stripe = MockServer::start().await;
    let p = purger(app, &stripe, email_api);
    (p, stripe)
}

#[tokio::test]
async fn a_refused_farewell_email_does_not_stop_the_purge() {
    let (app, alice, email_api) = deleted_account().await;
    let stripe = MockServer::start().await;
    let p = purger(&app, &stripe, &email_api);
    let later = chrono::Utc::now() + chrono::Duration::days(31);

    Mock::given(method("POST"))
        .and(path("/emails"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&email_api)
        .await;
    Mock::given(method("POST"))
        .and(path("/emails"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "statusCode": 422, "name": "validation_error", "message": "Invalid `to` field."
        })))
        .mount(&email_api)
        .await;
    assert!(
        purge::purge(&p, alice, later).await.is_err(),
        "a transient failure retries"
    );
    assert_eq!(
        purge::purge(&p, alice, later).await.unwrap(),
        Outcome::Purged
    );
    assert_eq!(
        count(
            &app,
            "select count(*) from accounts where account_id = $1 and email is not null",
            alice
        )
        .await,
        0
    );
    let detail: String = sqlx::query_scalar(
        "select payload->>'detail' from events
          where stream_id = 'account-' || $1 and event_type = 'AccountPurgeStepCompleted'
            and payload->>'step' = 'farewell_email'",
    )
    .bind(alice.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(detail, "not sent: refused by the email API (HTTP 422)");
    // Purged is purged, whatever the clock of the one restoring says (the
    // purge ran here on a clock 31 days ahead). It brought back an account
    // with no address and no data key.
    let restored = crate::access::restore_at(&app.db.pool, alice, chrono::Utc::now()).await;
    assert_eq!(restored, slate_events::accounts::Restore::NotRestorable);
}

/// A purge that began and failed before its erase (here: after deleting
/// the account's media) ends the grace period, whatever the clock of the
/// one restoring says: its media is gone and its subscriptions canceled.
/// A restore then brought back an account half purged, and the purge of a
/// later deletion skipped the steps it found done (the media made since
/// stayed, no subscription was canceled, no farewell sent). The re-run
/// finishes the purge.
#[tokio::test]
async fn a_purge_that_began_ends_the_grace_period() {
    let (app, alice, email_api) = deleted_account().await;
    let (p, _stripe) = farewell_purger(&app, &email_api).await;
    let later = chrono::Utc::now() + chrono::Duration::days(31);
    let crashing = Purger {
        crash_after: Some("storage"),
        ..p.clone()
    };
    assert!(purge::purge(&crashing, alice, later).await.is_err());
    let restored = crate::access::restore_at(&app.db.pool, alice, chrono::Utc::now()).await;
    assert_eq!(restored, slate_events::accounts::Restore::NotRestorable);
    assert_eq!(
        purge::purge(&p, alice, later).await.unwrap(),
        Outcome::Purged
    );
    let steps: Vec<String> = sqlx::query_scalar(
        "select payload->>'step' from events
          where stream_id = 'account-' || $1 and event_type = 'AccountPurgeStepCompleted'
          order by global_position",
    )
    .bind(alice.to_string())
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(steps, ["stripe", "storage", "farewell_email"]);
}

/// The purge waits on Stripe, S3 and the email API with no transaction id:
/// while the email API takes its time over the farewell, no connection to
/// the database holds one (the account row's lock gave the purge's
/// transaction one for the whole purge, which held back every asynchronous
/// projector for as long). A restore meanwhile, by a clock that says the
/// grace period is not over, still waits for the purge, and then finds
/// nothing to restore.
#[tokio::test]
async fn the_purge_waits_on_other_services_holding_no_transaction_id() {
    let (app, alice, email_api) = deleted_account().await;
    Mock::given(method("POST"))
        .and(path("/emails"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "4ef9a417-02e9-4d39-ad75-9611e0fcc33c"}))
                .set_delay(std::time::Duration::from_millis(1500)),
        )
        .mount(&email_api)
        .await;
    let stripe = MockServer::start().await;
    let p = purger(&app, &stripe, &email_api);
    let later = chrono::Utc::now() + chrono::Duration::days(31);
    let purging = tokio::spawn(async move { purge::purge(&p, alice, later).await.unwrap() });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while email_api.received_requests().await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no farewell was sent"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let open = crate::harness::open_transactions(&app.db.pool).await;
    assert!(
        open.iter().all(|(_, xid)| xid.is_none()),
        "while the email API answers: {open:?}"
    );
    let pool = app.db.pool.clone();
    let restoring = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let restored = slate_events::accounts::restore(
            &mut tx,
            alice,
            chrono::Utc::now(),
            slate_events::Metadata::system(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        restored
    });
    assert_eq!(purging.await.unwrap(), Outcome::Purged);
    assert_eq!(
        restoring.await.unwrap(),
        slate_events::accounts::Restore::NotRestorable
    );
}

/// `serve` and `work` as real processes at trace level, with the body
/// debug switch on for the submission route, through a generation and a
/// deletion (whose email goes to a fake email API); then a dump of the
/// database. Neither the logs nor the dump outside `accounts` hold the
/// prompt, the email address, the API key or the email API's key; the
/// debugged route's bodies are logged, scrubbed.
#[tokio::test]
async fn trace_logs_of_serve_and_work_and_a_database_dump_hold_no_prompt_email_or_secret() {
    use std::process::{Command, Stdio};

    let db = crate::harness::TestDb::new().await;
    let email_api = fake_email_api().await;
    let bin = env!("CARGO_BIN_EXE_slate");
    let email = format!("privacy-{}@example.com", Uuid::new_v4().simple());
    let prompt = format!("a violet lighthouse {}", Uuid::new_v4().simple());
    let email_api_key = "re_test_key";
    let out = Command::new(bin)
        .args(["accounts", "create", "--email", &email])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created = String::from_utf8(out.stdout).unwrap();
    let key = created.lines().last().unwrap().trim().to_owned();
    let account: Uuid = created
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("account ")
        .trim()
        .parse()
        .unwrap();
    crate::credits::grant(
        &mut *db.conn().await,
        account,
        50,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir();
    let serve_log = dir.join(format!("slate-privacy-serve-{}.log", Uuid::new_v4()));
    let work_log = dir.join(format!("slate-privacy-work-{}.log", Uuid::new_v4()));
    let spawn = |args: &[&str], log: &std::path::Path| {
        Command::new(bin)
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("SLATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("SLATE_DEBUG_BODIES", "/v1/generations")
            .env("SLATE_EMAIL_API_KEY", email_api_key)
            .env("SLATE_EMAIL_API_BASE", email_api.uri())
            .env("SLATE_LOG_FORMAT", "json")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let mut serve = spawn(&["serve"], &serve_log);
    let mut work = spawn(&["work"], &work_log);
    let user_agent = format!("privacy-agent/{}", Uuid::new_v4().simple());
    let client = reqwest::Client::builder()
        .user_agent(&user_agent)
        .build()
        .unwrap();
    let address = format!("http://127.0.0.1:{port}");
    crate::harness::until_serving(&address, || serve.try_wait().unwrap().is_none()).await;

    let r = client
        .post(format!("{address}/v1/generations"))
        .bearer_auth(&key)
        .json(&json!({"kind": "script", "provider": "local", "prompt": prompt}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let g: Value = client
            .get(format!("{address}/v1/generations/{id}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if g["status"] == "succeeded" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the generation did not finish: {g}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let r = client
        .delete(format!("{address}/v1/account"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while email_api.received_requests().await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the email was not sent"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let sent: Value = email_api.received_requests().await.unwrap()[0]
        .body_json()
        .unwrap();
    assert_eq!(
        sent["to"],
        json!([email]),
        "the worker sent it to the account's address"
    );

    for child in [&mut serve, &mut work] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let logs =
        std::fs::read_to_string(&serve_log).unwrap() + &std::fs::read_to_string(&work_log).unwrap();
    let _ = std::fs::remove_file(&serve_log);
    let _ = std::fs::remove_file(&work_log);
    let plain_url = db.url.split('?').next().unwrap().to_owned();
    let dump = Command::new("pg_dump")
        .args(["--data-only", "--exclude-table=public.accounts"])
        .arg(&plain_url)
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains(&id), "the dump has the data");

    for (what, needle) in [
        ("the prompt", prompt.as_str()),
        ("the email address", email.as_str()),
        ("the API key", key.as_str()),
        ("the email API's key", email_api_key),
        ("the user agent", user_agent.as_str()),
    ] {
        assert!(!logs.contains(needle), "{what} is in the logs");
        assert!(
            !dump.contains(needle),
            "{what} is in the database outside accounts"
        );
    }
    assert!(
        logs.contains("request body") && logs.contains("[scrubbed]"),
        "the debugged route's bodies are logged, scrubbed"
    );
}

/// Stripe's subscription endpoints for subscriptions with state: a GET
/// reads one, a POST updates its `cancel_at_period_end`, `cancel_at` and
/// metadata from the form, as Stripe does (an empty metadata value unsets
/// the key).
struct RenewableSubscriptions(Arc<std::sync::Mutex<std::collections::HashMap<String, Value>>>);

impl Respond for RenewableSubscriptions {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = request.url.path().rsplit('/').next().unwrap().to_owned();
        let mut subs = self.0.lock().unwrap();
        let Some(sub) = subs.get_mut(&id) else {
            return ResponseTemplate::new(404).set_body_json(json!({"error": {
                "type": "invalid_request_error", "code": "resource_missing",
                "message": format!("No such subscription: '{id}'"), "param": "id"}}));
        };
        if request.method.as_str() == "POST" && sub["x_refuse_updates"] == true {
            return ResponseTemplate::new(400).set_body_json(json!({"error": {
                "type": "invalid_request_error",
                "message": "This subscription cannot be updated right now."}}));
        }
        if request.method.as_str() == "POST" {
            for pair in String::from_utf8_lossy(&request.body).split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let k = k.replace("%5B", "[").replace("%5D", "]");
                // As Stripe: ending at the period's end sets `cancel_at` to
                // it; a date clears `cancel_at_period_end`.
                if k == "cancel_at_period_end" {
                    sub["cancel_at_period_end"] = (v == "true").into();
                    sub["cancel_at"] = if v == "true" {
                        sub["items"]["data"][0]["current_period_end"].clone()
                    } else {
                        Value::Null
                    };
                } else if k == "cancel_at" {
                    sub["cancel_at"] = v.parse::<i64>().unwrap().into();
                    sub["cancel_at_period_end"] = false.into();
                } else if let Some(name) = k
                    .strip_prefix("metadata[")
                    .and_then(|n| n.strip_suffix(']'))
                {
                    let metadata = sub["metadata"].as_object_mut().unwrap();
                    if v.is_empty() {
                        metadata.remove(name);
                    } else {
                        metadata.insert(name.to_owned(), v.into());
                    }
                }
            }
        }
        ResponseTemplate::new(200).set_body_json(sub.clone())
    }
}

/// Run every queued renewal job once, oldest first (or newest first),
/// as the worker would, and take it off the queue.
async fn run_renewal_jobs(
    app: &TestApp,
    renewals: &slate_workers::renewal::Renewals,
    newest_first: bool,
) -> usize {
    let jobs: Vec<(String, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select id, job from apalis.jobs where job_type = 'slate.renewal' order by id {}",
        if newest_first { "desc" } else { "asc" }
    )))
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    for (id, job) in &jobs {
        let job: slate_workers::renewal::RenewalJob = serde_json::from_slice(job).unwrap();
        slate_workers::renewal::reconcile(renewals, job.account_id, id, 1)
            .await
            .unwrap();
        sqlx::query("delete from apalis.jobs where id = $1")
            .bind(id)
            .execute(&app.db.pool)
            .await
            .unwrap();
    }
    jobs.len()
}

/// A deleted account's subscriptions stop renewing at once, so no renewal
/// is charged during the 30 days before the purge cancels them; a restore
/// makes them renew again. One its owner had set to end stays so both ways.
/// A job run twice changes nothing twice, and jobs run out of order leave
/// what the account is now. (Before, a renewal in the grace period charged
/// the card and credited an account its owner could not reach.)
#[tokio::test]
async fn a_deleted_accounts_subscriptions_stop_renewing_until_it_is_restored() {
    use slate_workers::renewal::{Changed, MARK_KEY, MARK_VALUE};
    let app = crate::stripe::stripe_app().await;
    let (_, staff_key) = app.staff().await;
    let (stripe, state, _, renewals) = fake_stripe_for_renewals(&app).await;

    // Alice's subscription renews; Bob had set his to end (the portal's
    // cancel). Both are mirrored from Stripe's events.
    let (alice, alice_key, alice_sub) = subscribed(&app, &state, |_| {}).await;
    let (bob, bob_key, bob_sub) = subscribed(&app, &state, |sub| {
        sub["cancel_at_period_end"] = true.into();
    })
    .await;
    // A second one of Alice's, which Stripe will not change (and which
    // comes first): it does not hold up the other.
    let other = format!("0{}", &alice_sub["sub_".len()..]);
    let (status, _) = app
        .deliver(&crate::stripe::fixture(
            "03_customer_subscription_created",
            alice,
            &other,
        ))
        .await;
    assert_eq!(status, 200);
    app.process_stripe().await;
    let mut refused = state.lock().unwrap()[&alice_sub].clone();
    refused["id"] = format!("sub_{other}").into();
    refused["x_refuse_updates"] = true.into();
    state
        .lock()
        .unwrap()
        .insert(format!("sub_{other}"), refused);
    let sub = |id: &str| state.lock().unwrap()[id].clone();
    let posts = async || {
        stripe
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.method.as_str() == "POST")
            .collect::<Vec<_>>()
    };
    let recorded = async |account: Uuid| -> Vec<(bool, String)> {
        sqlx::query_as(
            "select (payload->>'renews')::bool, payload->>'detail' from events
              where stream_id = 'account-' || $1 and event_type = 'SubscriptionRenewalChanged'
              order by global_position",
        )
        .bind(account.to_string())
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
    };

    for key in [&alice_key, &bob_key] {
        assert_eq!(app.delete_account(key).await, 202);
    }
    assert_eq!(
        run_renewal_jobs(&app, &renewals, false).await,
        2,
        "one job per deletion"
    );
    assert_eq!(sub(&alice_sub)["cancel_at_period_end"], true);
    assert_eq!(sub(&alice_sub)["metadata"][MARK_KEY], MARK_VALUE);
    assert_eq!(sub(&bob_sub)["cancel_at_period_end"], true);
    assert!(
        sub(&bob_sub)["metadata"].get(MARK_KEY).is_none(),
        "Bob's own, left alone"
    );
    let sent: Vec<_> = posts()
        .await
        .into_iter()
        .filter(|r| r.url.path().ends_with(&alice_sub))
        .collect();
    assert_eq!(sent.len(), 1, "Alice's was changed, once");
    assert!(sent[0].headers.get("idempotency-key").is_some());
    assert_eq!(
        recorded(alice).await,
        vec![
            (false, "Stripe refused the change (HTTP 400)".to_owned()),
            (false, "set to end at the period's end".to_owned())
        ]
    );
    assert_eq!(
        recorded(bob).await,
        vec![(false, "already set to end by its owner".to_owned())]
    );
    // Another run (as after a crash before the job's end) reads the state
    // first and changes nothing.
    let again = renewals.clone();
    let rerun = slate_workers::renewal::reconcile(&again, alice, "a-rerun", 1)
        .await
        .unwrap();
    assert_eq!(
        rerun.last().unwrap(),
        &(
            alice_sub.clone(),
            Changed::Unchanged("already set to end by the deletion")
        )
    );
    let changes = posts().await.len();
    assert_eq!(changes, 3, "Alice's, and the refused one's twice");
    app.db.settle_projections().await;
    let actions: Vec<String> = sqlx::query_scalar(
        "select action from audit_entries where account_id = $1 and action like 'subscription.renewal%' order by seq",
    )
    .bind(alice)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        actions,
        [
            "subscription.renewal_unchanged",
            "subscription.renewal_stopped",
            "subscription.renewal_unchanged",
            "subscription.renewal_unchanged"
        ]
    );

    // Staff restore both: Alice's renews again, Bob's stays as he set it.
    for account in [alice, bob] {
        let (status, body) = app.restore_as_staff(&staff_key, account).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(
        run_renewal_jobs(&app, &renewals, false).await,
        2,
        "one job per restore"
    );
    assert_eq!(sub(&alice_sub)["cancel_at_period_end"], false);
    assert!(
        sub(&alice_sub)["metadata"].get(MARK_KEY).is_none(),
        "the mark is gone"
    );
    assert_eq!(
        sub(&alice_sub)["metadata"]["plan"],
        "pro",
        "the rest of it stays"
    );
    assert_eq!(sub(&bob_sub)["cancel_at_period_end"], true);
    assert_eq!(posts().await.len(), changes + 1);
    assert_eq!(
        recorded(alice).await.last().unwrap(),
        &(true, "set to renew again".to_owned())
    );
    assert_eq!(
        recorded(bob).await.last().unwrap(),
        &(true, "set to end by its owner, not the deletion".to_owned())
    );

    // Deleted and restored again before the jobs ran, which then run newest
    // first: each does what the account is when it runs (restored), so
    // Stripe is not asked to change anything.
    let fresh = slate_events::access::create_key(
        &mut *app.db.conn().await,
        alice,
        None,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap()
    .plaintext;
    assert_eq!(app.delete_account(&fresh).await, 202);
    let (status, _) = app.restore_as_staff(&staff_key, alice).await;
    assert_eq!(status, 200);
    assert_eq!(run_renewal_jobs(&app, &renewals, true).await, 2);
    assert_eq!(sub(&alice_sub)["cancel_at_period_end"], false);
    assert_eq!(posts().await.len(), changes + 1);
}

/// The maintenance sweep finds what no job saw to: an account deleted
/// before the renewal job existed (or a subscription mirrored after its job
/// ran) gets a job, once; so does a restored account whose subscription the
/// deletion had set to end. Where Stripe is not configured, the job records
/// that and the sweep lets it be. After a job that gave up, the next waits.
#[tokio::test]
async fn the_sweep_schedules_the_renewal_jobs_nobody_enqueued() {
    let app = crate::stripe::stripe_app().await;
    let (_stripe, state, _, renewals) = fake_stripe_for_renewals(&app).await;
    let (alice, _, sub_id) = subscribed(&app, &state, |_| {}).await;
    let sweep = async |minutes: i64| {
        let at = chrono::Utc::now() + chrono::Duration::minutes(minutes);
        slate_workers::sweeper::sweep(&app.db.pool, at)
            .await
            .unwrap()
            .renewals_scheduled
    };
    // What the mirror says once Stripe's event of the change has come.
    let mirror_ends = async |ends: bool| {
        sqlx::query(
            "update stripe_subscriptions set cancel_at_period_end = $2 where subscription_id = $1",
        )
        .bind(&sub_id)
        .bind(ends)
        .execute(&app.db.pool)
        .await
        .unwrap();
    };
    // Restored (as before the job existed), the mirror still saying the
    // deletion's stop.
    let restored_without_a_job = async || {
        crate::access::restore_at(&app.db.pool, alice, chrono::Utc::now()).await;
        mirror_ends(true).await;
    };
    assert_eq!(
        sweep(0).await,
        0,
        "a live account's subscription is left alone"
    );

    // Deleted without a job (as before the job existed).
    crate::access::delete_committed(&app.db.pool, alice, chrono::Utc::now()).await;
    assert_eq!(sweep(10).await, 1);
    assert_eq!(sweep(20).await, 0, "one job at a time");
    assert_eq!(run_renewal_jobs(&app, &renewals, false).await, 1);
    assert_eq!(state.lock().unwrap()[&sub_id]["cancel_at_period_end"], true);
    // The mirror still says it renews (Stripe's event has not come), but
    // the outcome is recorded.
    assert_eq!(sweep(30).await, 0);
    // A second stop (a duplicate job) changes nothing and says so.
    slate_workers::renewal::reconcile(&renewals, alice, "a-duplicate", 1)
        .await
        .unwrap();

    // Restored without a job: the one the deletion stopped renews again.
    restored_without_a_job().await;
    assert_eq!(sweep(40).await, 1);
    assert_eq!(run_renewal_jobs(&app, &renewals, false).await, 1);
    assert_eq!(
        state.lock().unwrap()[&sub_id]["cancel_at_period_end"],
        false
    );
    assert_eq!(sweep(50).await, 0);

    // Deleted again where Stripe is not configured: recorded, then left.
    crate::access::delete_committed(&app.db.pool, alice, chrono::Utc::now()).await;
    mirror_ends(false).await;
    assert_eq!(sweep(60).await, 1);
    let unconfigured = slate_workers::renewal::Renewals {
        pool: app.db.pool.clone(),
        stripe: None,
    };
    assert_eq!(run_renewal_jobs(&app, &unconfigured, false).await, 1);
    assert_eq!(sweep(70).await, 0);
    let last: String = sqlx::query_scalar(
        "select payload->>'detail' from events
          where stream_id = 'account-' || $1 and event_type = 'SubscriptionRenewalChanged'
          order by global_position desc limit 1",
    )
    .bind(alice.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(last, "Stripe is not configured here");

    // Restored again without a job, and the job the sweep enqueues gives
    // up (a revoked key, say): the sweep waits six hours before the next,
    // rather than start one an hour for as long as the error lasts.
    restored_without_a_job().await;
    assert_eq!(sweep(80).await, 1);
    sqlx::query(
        "update apalis.jobs set status = 'Failed', attempts = max_attempts, done_at = now()
          where job_type = 'slate.renewal'",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(sweep(170).await, 0, "a job that gave up is waited for");
    assert_eq!(sweep(370).await, 1, "and tried again six hours after");
    // Unless the period ends before the wait would be over.
    let dead_at = async |minutes: i32| {
        sqlx::query(
            "update apalis.jobs set status = 'Failed', attempts = max_attempts,
                    done_at = now() + make_interval(mins => $1)
              where job_type = 'slate.renewal'",
        )
        .bind(minutes)
        .execute(&app.db.pool)
        .await
        .unwrap();
    };
    let period_ends_in_hours = async |hours: i32| {
        sqlx::query(
            "update stripe_subscriptions set current_period_end = now() + make_interval(hours => $2)
              where subscription_id = $1",
        )
        .bind(&sub_id)
        .bind(hours)
        .execute(&app.db.pool)
        .await
        .unwrap();
    };
    dead_at(370).await;
    period_ends_in_hours(24 * 20).await;
    assert_eq!(sweep(380).await, 0);
    period_ends_in_hours(8).await;
    assert_eq!(sweep(390).await, 1, "it renews within the wait");
}

type Subscriptions = Arc<std::sync::Mutex<std::collections::HashMap<String, Value>>>;

/// A fake Stripe holding subscriptions (see [`RenewableSubscriptions`]) and
/// open invoices (a POST sets the form's `auto_advance`, a GET reads it;
/// true until set), and the renewal job's dependencies pointed at it.
async fn fake_stripe_for_renewals(
    app: &TestApp,
) -> (
    MockServer,
    Subscriptions,
    Arc<std::sync::Mutex<std::collections::HashMap<String, bool>>>,
    slate_workers::renewal::Renewals,
) {
    let stripe = MockServer::start().await;
    let subscriptions: Subscriptions = Default::default();
    let invoices: Arc<std::sync::Mutex<std::collections::HashMap<String, bool>>> =
        Default::default();
    Mock::given(path_regex("^/v1/subscriptions/sub_[a-z0-9]+$"))
        .respond_with(RenewableSubscriptions(subscriptions.clone()))
        .mount(&stripe)
        .await;
    let recorded = invoices.clone();
    Mock::given(path_regex("^/v1/invoices/in_[a-z0-9_]+$"))
        .respond_with(move |request: &Request| {
            let id = request.url.path().rsplit('/').next().unwrap().to_owned();
            let mut invoices = recorded.lock().unwrap();
            if request.method.as_str() == "POST" {
                let body = String::from_utf8_lossy(&request.body).into_owned();
                let on = body.split('&').any(|p| p == "auto_advance=true");
                invoices.insert(id.clone(), on);
            }
            let on = invoices.get(&id).copied().unwrap_or(true);
            ResponseTemplate::new(200).set_body_json(json!({
                "id": id, "object": "invoice", "status": "open", "auto_advance": on}))
        })
        .mount(&stripe)
        .await;
    let config = slate::config::Config::from_lookup(|k| match k {
        "STRIPE_API_KEY" => Some("sk_test_purge".into()),
        "STRIPE_API_BASE" => Some(stripe.uri()),
        _ => None,
    })
    .unwrap();
    let renewals = slate_workers::renewal::Renewals {
        pool: app.db.pool.clone(),
        stripe: config
            .stripe_client()
            .unwrap()
            .map(slate::stripe::billing::subscription_renewal),
    };
    (stripe, subscriptions, invoices, renewals)
}

/// A new account with a subscription mirrored from Stripe's events, and
/// the fake Stripe's copy of it, shaped by `shape`: (account, key,
/// subscription id).
async fn subscribed(
    app: &TestApp,
    subscriptions: &Subscriptions,
    shape: impl FnOnce(&mut Value),
) -> (Uuid, String, String) {
    let (account, key) = crate::billing::key_for(app).await;
    let (run, mut object) = subscribe(app, account).await;
    shape(&mut object);
    let id = format!("sub_{run}");
    subscriptions.lock().unwrap().insert(id.clone(), object);
    (account, key, id)
}

/// `account` subscribes: Stripe's checkout and subscription events
/// delivered and processed. Returns the run tag in their ids and the
/// subscription object.
async fn subscribe(app: &TestApp, account: Uuid) -> (String, Value) {
    let run = Uuid::new_v4().simple().to_string()[..10].to_owned();
    for name in [
        "02_checkout_session_completed_subscription",
        "03_customer_subscription_created",
    ] {
        let (status, _) = app
            .deliver(&crate::stripe::fixture(name, account, &run))
            .await;
        assert_eq!(status, 200);
    }
    app.process_stripe().await;
    let object = serde_json::from_str::<Value>(&crate::stripe::fixture(
        "03_customer_subscription_created",
        account,
        &run,
    ))
    .unwrap()["data"]["object"]
        .clone();
    (run, object)
}

/// Delete the account with its key, then restore it as staff, running the
/// renewal jobs after each; `between` looks in between.
async fn delete_then_restore(
    app: &TestApp,
    account: Uuid,
    key: &str,
    renewals: &slate_workers::renewal::Renewals,
    between: impl FnOnce(),
) {
    assert_eq!(app.delete_account(key).await, 202);
    assert_eq!(run_renewal_jobs(app, renewals, false).await, 1);
    between();
    let (_, staff_key) = app.staff().await;
    let (status, _) = app.restore_as_staff(&staff_key, account).await;
    assert_eq!(status, 200);
    assert_eq!(run_renewal_jobs(app, renewals, false).await, 1);
}

/// A subscription its owner set to cancel at a date after the current
/// period renews until then: a deletion stops it at the period's end, and a
/// restore puts the owner's date back. (Any `cancel_at` counted as ended by
/// its owner, and such a subscription renewed through the grace period.)
#[tokio::test]
async fn a_subscription_set_to_cancel_after_its_period_stops_and_gets_its_date_back() {
    use slate_workers::renewal::OWNERS_DATE_KEY;
    let app = crate::stripe::stripe_app().await;
    let (_stripe, subscriptions, _, renewals) = fake_stripe_for_renewals(&app).await;
    let mut dates = (0, 0);
    let (carol, key, id) = subscribed(&app, &subscriptions, |sub| {
        let period_end = sub["items"]["data"][0]["current_period_end"]
            .as_i64()
            .unwrap();
        dates = (period_end, period_end + 60 * 86_400);
        sub["cancel_at"] = dates.1.into();
    })
    .await;
    let (period_end, owners_date) = dates;
    let sub = || subscriptions.lock().unwrap()[&id].clone();
    delete_then_restore(&app, carol, &key, &renewals, || {
        assert_eq!(sub()["cancel_at_period_end"], true);
        assert_eq!(sub()["cancel_at"], period_end, "ends with this period");
        assert_eq!(sub()["metadata"][OWNERS_DATE_KEY], owners_date.to_string());
    })
    .await;
    assert_eq!(sub()["cancel_at_period_end"], false);
    assert_eq!(sub()["cancel_at"], owners_date, "the owner's date is back");
    assert!(sub()["metadata"].get(OWNERS_DATE_KEY).is_none());
    assert_eq!(sub()["metadata"]["plan"], "pro");
}

/// A past-due subscription's unpaid renewal is retried by Stripe whatever
/// the subscription does next: a deletion pauses that invoice's automatic
/// collection as well, and a restore resumes it. (Stripe's retries charged
/// the card during the grace period and credited the deleted account.)
#[tokio::test]
async fn a_past_due_renewal_is_not_collected_while_the_account_is_deleted() {
    use slate_workers::renewal::PAUSED_INVOICE_KEY;
    let app = crate::stripe::stripe_app().await;
    let (_stripe, subscriptions, invoices, renewals) = fake_stripe_for_renewals(&app).await;
    let past_due = async || {
        let (account, key, id) = subscribed(&app, &subscriptions, |sub| {
            sub["status"] = "past_due".into();
        })
        .await;
        let invoice = subscriptions.lock().unwrap()[&id]["latest_invoice"]
            .as_str()
            .unwrap()
            .to_owned();
        (account, key, id, invoice)
    };
    let (dave, key, id, invoice) = past_due().await;
    let sub = || subscriptions.lock().unwrap()[&id].clone();
    delete_then_restore(&app, dave, &key, &renewals, || {
        assert_eq!(invoices.lock().unwrap().get(&invoice), Some(&false));
        assert_eq!(sub()["cancel_at_period_end"], true);
        assert_eq!(sub()["metadata"][PAUSED_INVOICE_KEY], invoice.as_str());
    })
    .await;
    assert_eq!(invoices.lock().unwrap().get(&invoice), Some(&true));
    assert_eq!(sub()["cancel_at_period_end"], false);
    assert!(sub()["metadata"].get(PAUSED_INVOICE_KEY).is_none());

    // One whose unpaid invoice was no longer collected (retries over, or
    // collected by hand) is left so: a restore does not start charging it.
    let (erin, key, id, invoice) = past_due().await;
    invoices.lock().unwrap().insert(invoice.clone(), false);
    let sub = || subscriptions.lock().unwrap()[&id].clone();
    delete_then_restore(&app, erin, &key, &renewals, || {
        assert_eq!(sub()["cancel_at_period_end"], true);
        assert!(sub()["metadata"].get(PAUSED_INVOICE_KEY).is_none());
    })
    .await;
    assert_eq!(invoices.lock().unwrap().get(&invoice), Some(&false));
}

/// A purge that is due and not done shows in `/metrics` (what an alert
/// watches: a purge that keeps failing is retried for ever, quietly), and
/// stops showing once the account is purged.
#[tokio::test]
async fn metrics_show_purges_due_and_not_done() {
    let (app, alice, email_api) = deleted_account().await;
    let due = |text: &str| -> (i64, f64) {
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("{name} missing: {text}"))
        };
        (
            value("slate_purges_due ") as i64,
            value("slate_purge_due_oldest_seconds "),
        )
    };
    assert_eq!(due(&app.metrics().await), (0, 0.0), "in its grace period");
    sqlx::query(
        "update accounts set purge_after = now() - interval '2 hours' where account_id = $1",
    )
    .bind(alice)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let (n, oldest) = due(&app.metrics().await);
    assert_eq!(n, 1);
    assert!((7200.0..7300.0).contains(&oldest), "{oldest}");

    let (p, _stripe) = farewell_purger(&app, &email_api).await;
    assert_eq!(
        purge::purge(&p, alice, chrono::Utc::now()).await.unwrap(),
        Outcome::Purged
    );
    assert_eq!(due(&app.metrics().await), (0, 0.0), "purged");
}
