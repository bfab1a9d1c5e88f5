//! `slate demo story`: the whole service end to end, against a running
//! `slate serve` and `slate work`: an account buys credits through a signed
//! Stripe webhook, submits three generations on the local provider (one
//! forced to fail and refunded), and the balances and the event trail are
//! printed.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use slate_events::{Actor, Metadata};
use sqlx::PgPool;
use uuid::Uuid;

const EVENT_TEMPLATE: &str =
    include_str!("../tests/fixtures/stripe/01_checkout_session_completed_pack.json");

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<Value>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<Value>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run(
    pool: &PgPool,
    config: &crate::config::Config,
    base: &str,
    webhook_secret: &str,
) -> anyhow::Result<i32> {
    let http = reqwest::Client::new();
    println!("Slate demo — the service end to end at {base}\n");

    let mut conn = pool.acquire().await?;
    let email = format!(
        "story-{}@example.com",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let operator = Metadata::by(Actor::Operator {
        name: "demo".into(),
    });
    let account =
        slate_events::accounts::create_account(&mut conn, &email, false, operator.clone()).await?;
    let key = slate_events::access::create_key(&mut conn, account, Some("demo"), operator)
        .await?
        .plaintext;
    drop(conn);
    println!(
        "1. account {account} ({email}) with an API key {}…",
        &key[..22]
    );

    let run = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let event = EVENT_TEMPLATE
        .replace("{{ACCOUNT_ID}}", &account.to_string())
        .replace("{{RUN}}", &run);
    let header = crate::stripe::signature::sign(
        webhook_secret,
        chrono::Utc::now().timestamp(),
        event.as_bytes(),
    );
    let r = http
        .post(format!("{base}/webhooks/stripe"))
        .header("stripe-signature", header)
        .header("content-type", "application/json")
        .body(event)
        .send()
        .await
        .context("delivering the webhook")?;
    println!(
        "2. Stripe delivers checkout.session.completed (pack of 500 credits), signed: HTTP {}",
        r.status().as_u16()
    );
    let credits = |http: reqwest::Client, key: String| {
        let base = base.to_owned();
        async move {
            let v: Value = http
                .get(format!("{base}/v1/credits"))
                .bearer_auth(key)
                .send()
                .await?
                .json()
                .await?;
            Ok::<Value, anyhow::Error>(v)
        }
    };
    let balance = wait_for(
        "the worker to grant the credits",
        Duration::from_secs(60),
        || {
            let (http, key) = (http.clone(), key.clone());
            async move {
                let v = credits(http, key).await?;
                Ok((v["available"].as_i64() == Some(500)).then_some(v))
            }
        },
    )
    .await?;
    println!(
        "   the worker processed it: available {}, reserved {}",
        balance["available"], balance["reserved"]
    );

    println!("3. three generations on the local provider (the last one forced to fail)");
    let submissions = [
        json!({"kind": "video", "provider": "local", "prompt": "a paper boat crossing a puddle", "parameters": {"duration": 3}, "collection_id": "demo"}),
        json!({"kind": "voiceover", "provider": "local", "prompt": "Welcome to Slate.", "collection_id": "demo"}),
        json!({"kind": "script", "provider": "local", "prompt": "a thirty second ad", "parameters": {"fail": "permanent"}, "collection_id": "demo"}),
    ];
    let mut ids = Vec::new();
    for (i, body) in submissions.iter().enumerate() {
        let r = http
            .post(format!("{base}/v1/generations"))
            .bearer_auth(&key)
            .header("Idempotency-Key", format!("demo-{run}-{i}"))
            .json(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        let v: Value = r.json().await?;
        println!(
            "   POST /v1/generations {:<9} -> {status} {} (cost {})",
            body["kind"].as_str().unwrap_or(""),
            v["status"].as_str().unwrap_or(""),
            v["cost"]
        );
        ids.push(v["id"].as_str().unwrap_or_default().to_owned());
    }
    let v = credits(http.clone(), key.clone()).await?;
    println!(
        "   reserved while they run: available {}, reserved {}",
        v["available"], v["reserved"]
    );

    for id in &ids {
        let g = wait_for("a generation to finish", Duration::from_secs(120), || {
            let (http, key, url) = (
                http.clone(),
                key.clone(),
                format!("{base}/v1/generations/{id}"),
            );
            async move {
                let g: Value = http.get(url).bearer_auth(key).send().await?.json().await?;
                let done = matches!(
                    g["status"].as_str(),
                    Some("succeeded" | "failed" | "canceled")
                );
                Ok(done.then_some(g))
            }
        })
        .await?;
        let detail = match g["status"].as_str() {
            Some("succeeded") => format!(
                "{} {} bytes{}{}",
                g["output"]["content_type"].as_str().unwrap_or(""),
                g["output"]["bytes"],
                g["output"]["width"]
                    .as_i64()
                    .map(|w| format!(", {w}×{}", g["output"]["height"]))
                    .unwrap_or_default(),
                g["output"]["duration_ms"]
                    .as_i64()
                    .map(|d| format!(", {d} ms"))
                    .unwrap_or_default(),
            ),
            _ => format!("reason {}", g["failure_code"].as_str().unwrap_or("-")),
        };
        println!(
            "   {} {:<9} {:<9} {detail}",
            &id[..8],
            g["kind"].as_str().unwrap_or(""),
            g["status"].as_str().unwrap_or("")
        );
        if let Some(url) = g["output"]["url"].as_str() {
            let fetched = http.get(url).send().await?;
            println!(
                "            presigned URL serves it: HTTP {}",
                fetched.status().as_u16()
            );
        }
    }
    let v = credits(http.clone(), key.clone()).await?;
    println!(
        "4. balance: available {} (500 − 6 for the video − 2 for the voice-over; the failed script was refunded), reserved {}",
        v["available"], v["reserved"]
    );

    println!("\n5. the event trail of this account");
    let rows: Vec<(i64, String, String, Value)> = sqlx::query_as(
        "select global_position, stream_id, event_type, payload from events
          where stream_id = $1 or payload->>'account_id' = $2
             or stream_id = 'stripe-' || $3
          order by global_position",
    )
    .bind(format!("account-{account}"))
    .bind(account.to_string())
    .bind(format!("evt_{run}_01"))
    .fetch_all(pool)
    .await?;
    for (pos, stream, t, payload) in rows {
        let what = match t.as_str() {
            "CreditsGranted" | "CreditsReserved" | "CreditsCaptured" | "CreditsReleased" => {
                format!("{} credits", payload["amount"])
            }
            "GenerationRequested" => format!(
                "{} via {}, cost {}",
                payload["kind"].as_str().unwrap_or(""),
                payload["provider"].as_str().unwrap_or(""),
                payload["cost"]
            ),
            "GenerationFailed" => {
                format!("reason {}", payload["reason_code"].as_str().unwrap_or(""))
            }
            "GenerationSucceeded" => payload["content_type"].as_str().unwrap_or("").to_owned(),
            "StripeEventReceived" => payload["stripe_event_type"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            _ => String::new(),
        };
        let stream_kind = stream.split('-').next().unwrap_or("");
        println!("   #{pos:<6} {stream_kind:<11} {t:<22} {what}");
    }
    privacy(pool, config, &http, base, &key, account).await?;
    Ok(0)
}

/// Export, delete, and the purge 31 days later (the clock moved forward).
async fn privacy(
    pool: &PgPool,
    config: &crate::config::Config,
    http: &reqwest::Client,
    base: &str,
    key: &str,
    account: Uuid,
) -> anyhow::Result<()> {
    let bundle: Value = http
        .get(format!("{base}/v1/account/export"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "\n6. GET /v1/account/export: {} events, {} generations, {} ledger entries, email {}",
        bundle["events"].as_array().map_or(0, Vec::len),
        bundle["generations"].as_array().map_or(0, Vec::len),
        bundle["ledger"].as_array().map_or(0, Vec::len),
        bundle["account"]["email"]
    );
    let deleted = http
        .delete(format!("{base}/v1/account"))
        .bearer_auth(key)
        .send()
        .await?;
    let refused = http
        .get(format!("{base}/v1/credits"))
        .bearer_auth(key)
        .send()
        .await?;
    println!(
        "7. DELETE /v1/account -> {}; the key now gets {}",
        deleted.status().as_u16(),
        refused.status().as_u16()
    );
    let storage = slate_workers::storage::Storage::new(&config.storage());
    let prefix = slate_workers::storage::account_prefix(account);
    let objects = storage.list_prefix(&prefix).await?.len();
    let purger = slate_workers::purge::Purger {
        pool: pool.clone(),
        storage: storage.clone(),
        mailer: None,
        stripe: None,
        crash_after: None,
    };
    let later = chrono::Utc::now() + chrono::Duration::days(31);
    let outcome = slate_workers::purge::purge(&purger, account, later).await?;
    let sealed: String = sqlx::query_scalar(
        "select payload->>'email' from events where event_type = 'AccountCreated' and payload->>'account_id' = $1",
    )
    .bind(account.to_string())
    .fetch_one(pool)
    .await?;
    let mut conn = pool.acquire().await?;
    let opened = slate_events::vault::open(&mut conn, &sealed)
        .await?
        .or_erased();
    drop(conn);
    println!(
        "8. purge with the clock 31 days on: {outcome:?}; objects under {prefix}: {objects} -> {}; the email in the log now opens as {opened}",
        storage.list_prefix(&prefix).await?.len()
    );
    let steps: Vec<(String, String)> = sqlx::query_as(
        "select payload->>'step', payload->>'detail' from events
          where stream_id = $1 and event_type = 'AccountPurgeStepCompleted' order by global_position",
    )
    .bind(format!("account-{account}"))
    .fetch_all(pool)
    .await?;
    for (step, detail) in steps {
        println!("   step {step:<15} {detail}");
    }
    Ok(())
}
