//! `slate demo`: the ledger's story end to end on the configured services,
//! printed as it happens.

use chrono::{Duration, Utc};
use slate_events::catalog::GrantSource;
use slate_events::credits::{self, Grant, Reservation};
use slate_events::projections::{self, Projection};
use slate_events::{Actor, Metadata, store};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::Config;

fn line(s: impl AsRef<str>) {
    println!("  {}", s.as_ref());
}

async fn show_balance(pool: &PgPool, account: Uuid) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let b = credits::balance(&mut conn, account).await?;
    line(format!(
        "balance: available {} · reserved {} · debt {}",
        b.available, b.reserved, b.debt
    ));
    for bucket in &b.buckets {
        line(format!(
            "    bucket {} {:<12} granted {:>4}  left {:>4}  held {:>3}  spent {:>3}  revoked {:>3}{}",
            &bucket.bucket_id.to_string()[..8],
            bucket.source,
            bucket.amount,
            bucket.remaining,
            bucket.reserved,
            bucket.consumed,
            bucket.revoked,
            bucket
                .expires_at
                .map(|e| format!("  expires {}", e.format("%Y-%m-%d")))
                .unwrap_or_default()
        ));
    }
    Ok(())
}

pub async fn run(pool: &PgPool, config: &Config) -> anyhow::Result<i32> {
    println!("Slate demo — the two-phase credit ledger on PostgreSQL\n");
    let mut conn = pool.acquire().await?;
    let email = format!(
        "demo-{}@example.com",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let account = slate_events::accounts::create_account(
        &mut conn,
        &email,
        false,
        Metadata::by(Actor::Operator {
            name: "demo".into(),
        }),
    )
    .await?;
    println!("1. account {account} opened for {email}");
    let user = Metadata::by(Actor::User {
        account_id: account,
    });
    let stripe = Metadata::by(Actor::Stripe);

    println!("2. a purchase of 100 credits (expiring in 30 days) and 20 goodwill credits");
    let purchase = credits::grant(
        &mut conn,
        &Grant {
            account_id: account,
            amount: 100,
            source: GrantSource::Purchase,
            grant_key: format!("demo:cs_{}", Uuid::new_v4().simple()),
            stripe_object: Some(format!(
                "cs_demo_{}",
                &Uuid::new_v4().simple().to_string()[..12]
            )),
            expires_at: Some(Utc::now() + Duration::days(30)),
            reason: None,
        },
        &stripe,
    )
    .await?;
    credits::grant(
        &mut conn,
        &Grant {
            account_id: account,
            amount: 20,
            source: GrantSource::Goodwill,
            grant_key: format!("demo:goodwill:{}", Uuid::new_v4()),
            stripe_object: None,
            expires_at: None,
            reason: Some("welcome".into()),
        },
        &Metadata::by(Actor::Operator {
            name: "demo".into(),
        }),
    )
    .await?;
    show_balance(pool, account).await?;

    let hold = Utc::now() + Duration::hours(2);
    let video = Uuid::now_v7();
    println!("3. a video generation reserves 30 credits, succeeds, and is captured");
    credits::reserve(&mut conn, account, video, 30, hold, Utc::now(), &user).await?;
    let r = credits::capture(&mut conn, video, &Metadata::system()).await?;
    line(format!("capture: {}", r.outcome));
    let again = credits::capture(&mut conn, video, &Metadata::system()).await?;
    line(format!("capture retried: {} (no change)", again.outcome));
    show_balance(pool, account).await?;

    let voice = Uuid::now_v7();
    println!("4. a voice-over reserves 80 credits (spanning both buckets), fails, and is released");
    credits::reserve(&mut conn, account, voice, 80, hold, Utc::now(), &user).await?;
    show_balance(pool, account).await?;
    let r = credits::release(&mut conn, voice, "provider_failed", &Metadata::system()).await?;
    line(format!(
        "release: {} — {} credits back where they came from",
        r.outcome, r.amount
    ));
    show_balance(pool, account).await?;

    println!("5. a reservation larger than the balance is refused");
    match credits::reserve(
        &mut conn,
        account,
        Uuid::now_v7(),
        500,
        hold,
        Utc::now(),
        &user,
    )
    .await?
    {
        Reservation::Insufficient {
            available,
            shortfall,
        } => line(format!("refused: {available} available, {shortfall} short")),
        other => line(format!("unexpected: {other:?}")),
    }

    println!("6. the purchase is refunded in full after 30 of it were spent");
    let out = credits::revoke(
        &mut conn,
        account,
        purchase.bucket_id,
        100,
        &format!("demo:re_{}", Uuid::new_v4().simple()),
        Some("refund"),
        &stripe,
    )
    .await?;
    line(format!(
        "revoked {}: {} taken back, {} held by generations, {} recorded as debt",
        out.amount, out.taken, out.held, out.debt_added
    ));
    show_balance(pool, account).await?;

    println!("7. the next grant settles the debt first");
    credits::grant(
        &mut conn,
        &Grant {
            account_id: account,
            amount: 50,
            source: GrantSource::Promotion,
            grant_key: format!("demo:promo:{}", Uuid::new_v4()),
            stripe_object: None,
            expires_at: None,
            reason: Some("spring promotion".into()),
        },
        &Metadata::by(Actor::Operator {
            name: "demo".into(),
        }),
    )
    .await?;
    show_balance(pool, account).await?;

    println!(
        "8. a job vanishes with 10 credits held; the sweeper releases the hold after it expires"
    );
    let lost = Uuid::now_v7();
    credits::reserve(
        &mut conn,
        account,
        lost,
        10,
        Utc::now() + Duration::minutes(5),
        Utc::now(),
        &user,
    )
    .await?;
    let swept = slate_workers::sweeper::sweep(pool, Utc::now() + Duration::minutes(6)).await?;
    line(format!(
        "sweeper (clock +6 min): {} hold released",
        swept.holds_released
    ));
    show_balance(pool, account).await?;

    println!("\n9. the account's stream in the event log");
    for e in store::read_stream(&mut conn, &store::account_stream(account)).await? {
        let payload = e.payload.to_string();
        let short = if payload.len() > 110 {
            format!("{}…", &payload[..110])
        } else {
            payload
        };
        line(format!(
            "#{:<6} v{:<2} {:<16} {}",
            e.global_position, e.stream_version, e.event_type, short
        ));
    }
    drop(conn);

    println!(
        "\n10. the asynchronous ledger projection catches up, then every projection is verified"
    );
    for &p in Projection::ASYNC {
        let n = projections::catch_up(pool, p).await?;
        line(format!("{}: {n} events applied", p.name()));
    }
    let report = projections::verify(pool, Projection::ALL).await?;
    for t in &report.tables {
        line(format!(
            "{:<26} live {:>6} rebuilt {:>6}  {}",
            t.table,
            t.live_rows,
            t.rebuilt_rows,
            if t.is_clean() { "equal" } else { "DIFFERENT" }
        ));
    }

    println!("\n11. object storage at {}", config.s3_endpoint);
    let storage = slate_workers::storage::Storage::new(&config.storage());
    storage.ensure_bucket().await?;
    let key = format!(
        "{}collections/demo/readme.txt",
        slate_workers::storage::account_prefix(account)
    );
    storage
        .put(&key, b"hello from the slate demo".to_vec(), "text/plain")
        .await?;
    let back = storage.get(&key).await?;
    line(format!(
        "put and read back s3://{}/{key} ({} bytes)",
        config.s3_bucket,
        back.len()
    ));

    if report.is_clean() {
        println!("\nDemo finished: ledger consistent, projections equal to the log.");
        Ok(0)
    } else {
        println!("\nDemo finished with projection differences.");
        Ok(1)
    }
}
