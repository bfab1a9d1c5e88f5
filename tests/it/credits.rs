//! The two-phase ledger against real PostgreSQL.

use chrono::{DateTime, Duration, Utc};
use slate_events::catalog::GrantSource;
use slate_events::credits::{self, Grant, Reservation};
use slate_events::{Actor, Metadata, accounts};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::harness::TestDb;

pub async fn new_account(conn: &mut PgConnection) -> Uuid {
    let email = format!("{}@example.com", Uuid::new_v4().simple());
    accounts::create_account(conn, &email, false, Metadata::system())
        .await
        .unwrap()
}

/// A new API key of the account's; its plaintext.
pub async fn new_key(conn: &mut PgConnection, account: Uuid) -> String {
    slate_events::access::create_key(conn, account, None, Metadata::system())
        .await
        .unwrap()
        .plaintext
}

pub async fn grant(
    conn: &mut PgConnection,
    account: Uuid,
    amount: i64,
    source: GrantSource,
    expires_at: Option<DateTime<Utc>>,
) -> Uuid {
    let out = credits::grant(
        conn,
        &Grant {
            account_id: account,
            amount,
            source,
            grant_key: format!("test:{}", Uuid::new_v4()),
            stripe_object: Some(format!("cs_test_{}", Uuid::new_v4().simple())),
            expires_at,
            reason: None,
        },
        &Metadata::by(Actor::Stripe),
    )
    .await
    .unwrap();
    out.bucket_id
}

/// Reserve with a one-hour hold, as the account's user.
pub async fn try_reserve(
    conn: &mut PgConnection,
    account: Uuid,
    generation: Uuid,
    amount: i64,
) -> Result<Reservation, slate_events::Error> {
    credits::reserve(
        conn,
        account,
        generation,
        amount,
        Utc::now() + Duration::hours(1),
        Utc::now(),
        &Metadata::by(Actor::User {
            account_id: account,
        }),
    )
    .await
}

pub async fn reserve(conn: &mut PgConnection, account: Uuid, amount: i64) -> (Uuid, Reservation) {
    let generation = Uuid::now_v7();
    let r = try_reserve(conn, account, generation, amount)
        .await
        .unwrap();
    (generation, r)
}

async fn bucket_left(conn: &mut PgConnection, account: Uuid, bucket: Uuid) -> (i64, i64) {
    let b = credits::balance(conn, account).await.unwrap();
    let b = b
        .buckets
        .into_iter()
        .find(|b| b.bucket_id == bucket)
        .unwrap();
    (b.remaining, b.reserved)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_hundred_concurrent_reservations_on_fifty_credits_exactly_fifty_succeed() {
    let db = TestDb::with_pool_size(40).await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    grant(&mut conn, account, 30, GrantSource::Purchase, None).await;
    grant(
        &mut conn,
        account,
        20,
        GrantSource::Promotion,
        Some(Utc::now() + Duration::days(1)),
    )
    .await;
    drop(conn);

    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let pool = db.pool.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut conn = pool.acquire().await.unwrap();
            reserve(&mut conn, account, 1).await.1
        }));
    }
    let (mut reserved, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Reservation::Reserved { .. } => reserved += 1,
            Reservation::Insufficient {
                available,
                shortfall,
            } => {
                assert_eq!((available, shortfall), (0, 1));
                refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((reserved, refused), (50, 150));
    let mut conn = db.conn().await;
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (0, 50, 0));
    assert!(b.buckets.iter().all(|b| b.remaining == 0));
    let negative: i64 = sqlx::query_scalar(
        "select count(*) from credit_buckets where remaining < 0 or reserved < 0",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(negative, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_capture_and_release_of_one_reservation_exactly_one_takes_effect() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    grant(&mut conn, account, 1000, GrantSource::Purchase, None).await;
    let mut captured_total = 0;
    for _ in 0..20 {
        let (generation, _) = reserve(&mut conn, account, 7).await;
        let mut tasks = Vec::new();
        for i in 0..6 {
            let pool = db.pool.clone();
            tasks.push(tokio::spawn(async move {
                let mut conn = pool.acquire().await.unwrap();
                if i % 2 == 0 {
                    credits::capture(&mut conn, generation, &Metadata::system())
                        .await
                        .unwrap()
                } else {
                    credits::release(&mut conn, generation, "failed", &Metadata::system())
                        .await
                        .unwrap()
                }
            }));
        }
        let mut effects = Vec::new();
        for t in tasks {
            effects.push(t.await.unwrap());
        }
        let took: Vec<_> = effects.iter().filter(|r| r.took_effect()).collect();
        assert_eq!(took.len(), 1, "{effects:?}");
        let winner = took[0].status.clone();
        // Everyone else reports the earlier outcome.
        for r in effects.iter().filter(|r| !r.took_effect()) {
            assert_eq!(r.outcome, format!("already_{winner}"));
            assert_eq!(r.status, winner);
        }
        if winner == "captured" {
            captured_total += 7;
        }
    }
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!(b.reserved, 0);
    assert_eq!(b.available, 1000 - captured_total);
}

#[tokio::test]
async fn a_second_capture_or_release_is_a_no_op_reporting_the_earlier_outcome() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    grant(&mut conn, account, 10, GrantSource::Purchase, None).await;
    let (g, _) = reserve(&mut conn, account, 4).await;
    let first = credits::capture(&mut conn, g, &Metadata::system())
        .await
        .unwrap();
    assert_eq!(first.outcome, "captured");
    let again = credits::capture(&mut conn, g, &Metadata::system())
        .await
        .unwrap();
    assert_eq!(again.outcome, "already_captured");
    let late = credits::release(&mut conn, g, "failed", &Metadata::system())
        .await
        .unwrap();
    assert_eq!(late.outcome, "already_captured");
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved), (6, 0));
    let events: i64 =
        sqlx::query_scalar("select count(*) from events where event_type = 'CreditsCaptured'")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(events, 1);

    // Reserving again under the same generation id is the same reservation.
    let (g2, _) = reserve(&mut conn, account, 2).await;
    let dup = try_reserve(&mut conn, account, g2, 2).await.unwrap();
    assert_eq!(
        dup,
        Reservation::Duplicate {
            status: "reserved".into(),
            amount: 2
        }
    );
    let other = try_reserve(&mut conn, account, g2, 3).await.unwrap_err();
    assert!(matches!(other, slate_events::Error::KeyReused));
}

#[tokio::test]
async fn a_reservation_spanning_two_buckets_released_returns_each_its_share() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    let soon = grant(
        &mut conn,
        account,
        30,
        GrantSource::Promotion,
        Some(Utc::now() + Duration::days(2)),
    )
    .await;
    let later = grant(
        &mut conn,
        account,
        50,
        GrantSource::Purchase,
        Some(Utc::now() + Duration::days(20)),
    )
    .await;
    let never = grant(&mut conn, account, 40, GrantSource::Goodwill, None).await;

    // Soonest expiry first: 30 from `soon`, 20 from `later`, none from `never`.
    let (g, r) = reserve(&mut conn, account, 50).await;
    assert!(matches!(
        r,
        Reservation::Reserved {
            amount: 50,
            available: 70
        }
    ));
    assert_eq!(bucket_left(&mut conn, account, soon).await, (0, 30));
    assert_eq!(bucket_left(&mut conn, account, later).await, (30, 20));
    assert_eq!(bucket_left(&mut conn, account, never).await, (40, 0));

    let out = credits::release(&mut conn, g, "provider_failed", &Metadata::system())
        .await
        .unwrap();
    assert_eq!(out.outcome, "released");
    assert_eq!(bucket_left(&mut conn, account, soon).await, (30, 0));
    assert_eq!(bucket_left(&mut conn, account, later).await, (50, 0));
    assert_eq!(bucket_left(&mut conn, account, never).await, (40, 0));
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (120, 0, 0));
}

#[tokio::test]
async fn a_revoke_of_a_partly_spent_purchase_leaves_the_right_debt_settled_by_the_next_grant() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    let purchase = grant(&mut conn, account, 100, GrantSource::Purchase, None).await;
    let (spent, _) = reserve(&mut conn, account, 60).await;
    credits::capture(&mut conn, spent, &Metadata::system())
        .await
        .unwrap();
    let (held, _) = reserve(&mut conn, account, 15).await;

    // Refund of the whole purchase: 25 left to take, 60 spent → debt, 15
    // held: their generation decides.
    let out = credits::revoke(
        &mut conn,
        account,
        purchase,
        100,
        "re_1",
        Some("refund"),
        &Metadata::by(Actor::Stripe),
    )
    .await
    .unwrap();
    assert_eq!(
        (out.outcome.as_str(), out.taken, out.held, out.debt_added),
        ("revoked", 25, 15, 60)
    );
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (0, 15, 60));

    // The same refund delivered again changes nothing.
    let again = credits::revoke(
        &mut conn,
        account,
        purchase,
        100,
        "re_1",
        Some("refund"),
        &Metadata::by(Actor::Stripe),
    )
    .await
    .unwrap();
    assert_eq!(again.outcome, "duplicate");
    // Nothing more can be taken from that purchase.
    let more = credits::revoke(
        &mut conn,
        account,
        purchase,
        10,
        "re_2",
        None,
        &Metadata::by(Actor::Stripe),
    )
    .await
    .unwrap();
    assert_eq!(more.outcome, "nothing_to_revoke");

    // The held 15 come back: the refund takes them; they are not available.
    let rel = credits::release(&mut conn, held, "canceled", &Metadata::system())
        .await
        .unwrap();
    assert_eq!(rel.outcome, "released");
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (0, 0, 60));
    let bucket = b.buckets.iter().find(|b| b.bucket_id == purchase).unwrap();
    assert_eq!((bucket.remaining, bucket.revoked), (0, 100));

    // The next grant settles the rest of the debt first.
    grant(&mut conn, account, 100, GrantSource::Subscription, None).await;
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (40, 0, 0));
    assert_invariant(&mut conn, account).await;
}

/// The account's debt, totals and held claims, as `(debt, total_debt_added,
/// total_debt_settled)`.
async fn debt_totals(conn: &mut PgConnection, account: Uuid) -> (i64, i64, i64) {
    sqlx::query_as(
        "select debt, total_debt_added, total_debt_settled from credit_accounts where account_id = $1",
    )
    .bind(account)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// A refund of `amount` of grant `bucket`, under a fresh key: what it took,
/// found lapsed, claimed held and made debt.
async fn refund(
    conn: &mut PgConnection,
    account: Uuid,
    bucket: Uuid,
    amount: i64,
) -> (i64, i64, i64, i64) {
    let out = credits::revoke(
        conn,
        account,
        bucket,
        amount,
        &format!("re_{}", Uuid::new_v4().simple()),
        Some("refund"),
        &Metadata::by(Actor::Stripe),
    )
    .await
    .unwrap();
    (out.taken, out.from_lapsed, out.held, out.debt_added)
}

/// Grant A 100 expiring, hold 40 of it, A lapses (60), A refunded in full,
/// then grant B 40: the account's state before the hold is resolved.
async fn refunded_while_held(conn: &mut PgConnection) -> (Uuid, Uuid, Uuid) {
    let account = new_account(conn).await;
    let t0 = Utc::now();
    let a = grant(
        conn,
        account,
        100,
        GrantSource::Purchase,
        Some(t0 + Duration::days(7)),
    )
    .await;
    let (held, _) = reserve(conn, account, 40).await;
    credits::expire(conn, t0 + Duration::days(8)).await.unwrap();
    // 60 had lapsed; 40 are held; nothing was spent, so nothing is owed.
    assert_eq!(refund(conn, account, a, 100).await, (0, 60, 40, 0));
    grant(conn, account, 40, GrantSource::Subscription, None).await;
    let b = credits::balance(conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (40, 40, 0));
    (account, a, held)
}

#[tokio::test]
async fn held_credits_of_a_refunded_grant_are_taken_back_when_released_and_owed_when_captured() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;

    // Released: the refund takes the 40 back; the credits granted after stay.
    // (They used to pay the held credits' debt and then lapse with them.)
    let (account, a, held) = refunded_while_held(&mut conn).await;
    credits::release(&mut conn, held, "provider_failed", &Metadata::system())
        .await
        .unwrap();
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (40, 0, 0));
    let bucket = b.buckets.iter().find(|b| b.bucket_id == a).unwrap();
    assert_eq!(
        (bucket.remaining, bucket.lapsed, bucket.revoked),
        (0, 60, 100)
    );
    assert_eq!(debt_totals(&mut conn, account).await, (0, 0, 0));
    assert_invariant(&mut conn, account).await;

    // Captured: the 40 were spent after all, and are owed; what is
    // available pays them at once.
    let (account, _, held) = refunded_while_held(&mut conn).await;
    credits::capture(&mut conn, held, &Metadata::system())
        .await
        .unwrap();
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (0, 0, 0));
    assert_eq!(debt_totals(&mut conn, account).await, (0, 40, 40));
    assert_invariant(&mut conn, account).await;
}

/// A bucket's claim is on all its holds: a capture owes only what the
/// others cannot give back, so the order generations end in changes
/// nothing. (The first capture owed its whole draw: captured before the
/// other's release, 40 credits were lost.)
#[tokio::test]
async fn a_claim_on_two_holds_ends_the_same_whichever_finishes_first() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let mut ends = Vec::new();
    for capture_first in [true, false] {
        let account = new_account(&mut conn).await;
        let t0 = Utc::now();
        let a = grant(
            &mut conn,
            account,
            100,
            GrantSource::Purchase,
            Some(t0 + Duration::days(7)),
        )
        .await;
        let (spent, _) = reserve(&mut conn, account, 50).await;
        let (failed, _) = reserve(&mut conn, account, 50).await;
        credits::expire(&mut conn, t0 + Duration::days(8))
            .await
            .unwrap();
        assert_eq!(refund(&mut conn, account, a, 60).await, (0, 0, 60, 0));
        let capture = async |conn: &mut PgConnection| {
            credits::capture(conn, spent, &Metadata::system())
                .await
                .unwrap();
        };
        let release = async |conn: &mut PgConnection| {
            credits::release(conn, failed, "provider_failed", &Metadata::system())
                .await
                .unwrap();
        };
        if capture_first {
            capture(&mut conn).await;
            grant(&mut conn, account, 50, GrantSource::Subscription, None).await;
            release(&mut conn).await;
        } else {
            release(&mut conn).await;
            grant(&mut conn, account, 50, GrantSource::Subscription, None).await;
            capture(&mut conn).await;
        }
        let b = credits::balance(&mut conn, account).await.unwrap();
        assert_invariant(&mut conn, account).await;
        ends.push((b.available, b.reserved, b.debt));
    }
    // 50 spent of the 100 refunded, of which 10 are owed: 40 of the 50 left.
    assert_eq!(ends, [(40, 0, 0), (40, 0, 0)]);
}

#[tokio::test]
async fn an_expired_bucket_lapses_and_held_credits_from_it_lapse_on_release() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    let t0 = Utc::now();
    let short = grant(
        &mut conn,
        account,
        40,
        GrantSource::Promotion,
        Some(t0 + Duration::days(7)),
    )
    .await;
    grant(&mut conn, account, 10, GrantSource::Goodwill, None).await;
    let (held, _) = reserve(&mut conn, account, 15).await; // from `short`

    // Not yet: nothing lapses a day before.
    assert_eq!(
        credits::expire(&mut conn, t0 + Duration::days(6))
            .await
            .unwrap(),
        0
    );
    // A week later the bucket lapses: its 25 unreserved credits are gone.
    assert_eq!(
        credits::expire(&mut conn, t0 + Duration::days(7) + Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved), (10, 15));
    let bucket = b.buckets.iter().find(|b| b.bucket_id == short).unwrap();
    assert!(bucket.expired);
    assert_eq!((bucket.remaining, bucket.lapsed), (0, 25));
    // Expiring again does nothing.
    assert_eq!(
        credits::expire(&mut conn, t0 + Duration::days(8))
            .await
            .unwrap(),
        0
    );

    // The held credits come back after the bucket lapsed: they lapse too.
    let out = credits::release(&mut conn, held, "provider_failed", &Metadata::system())
        .await
        .unwrap();
    assert_eq!(out.outcome, "released");
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved), (10, 0));
    assert_invariant(&mut conn, account).await;

    // A reservation at a time past another bucket's expiry lapses it first.
    let weekly = grant(
        &mut conn,
        account,
        5,
        GrantSource::Promotion,
        Some(t0 + Duration::days(1)),
    )
    .await;
    let r = credits::reserve(
        &mut conn,
        account,
        Uuid::now_v7(),
        12,
        t0 + Duration::days(3),
        t0 + Duration::days(2),
        &Metadata::system(),
    )
    .await
    .unwrap();
    assert_eq!(
        r,
        Reservation::Insufficient {
            available: 10,
            shortfall: 2
        }
    );
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert!(
        b.buckets
            .iter()
            .find(|b| b.bucket_id == weekly)
            .unwrap()
            .expired
    );
}

#[tokio::test]
async fn a_stranded_hold_is_released_by_the_sweeper_after_its_expiry() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    grant(&mut conn, account, 20, GrantSource::Purchase, None).await;
    let t0 = Utc::now();
    let generation = Uuid::now_v7();
    credits::reserve(
        &mut conn,
        account,
        generation,
        8,
        t0 + Duration::minutes(30),
        t0,
        &Metadata::system(),
    )
    .await
    .unwrap();
    drop(conn);

    let before = slate_workers::sweeper::sweep(&db.pool, t0 + Duration::minutes(29))
        .await
        .unwrap();
    assert_eq!(before.holds_released, 0);
    let after = slate_workers::sweeper::sweep(&db.pool, t0 + Duration::minutes(31))
        .await
        .unwrap();
    assert_eq!(after.holds_released, 1);
    let again = slate_workers::sweeper::sweep(&db.pool, t0 + Duration::minutes(40))
        .await
        .unwrap();
    assert_eq!(again.holds_released, 0);

    let mut conn = db.conn().await;
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved), (20, 0));
    let reason: String = sqlx::query_scalar(
        "select release_reason from credit_reservations where generation_id = $1",
    )
    .bind(generation)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(reason, "hold_expired");
    // A worker that turns up late cannot capture what was released.
    let late = credits::capture(&mut conn, generation, &Metadata::system())
        .await
        .unwrap();
    assert_eq!(late.outcome, "already_released");
}

#[tokio::test]
async fn caller_mistakes_are_typed_errors() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    let unknown = Uuid::now_v7();
    let e = credits::grant(
        &mut conn,
        &Grant {
            account_id: unknown,
            amount: 5,
            source: GrantSource::Goodwill,
            grant_key: "k".into(),
            stripe_object: None,
            expires_at: None,
            reason: None,
        },
        &Metadata::system(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, slate_events::Error::UnknownAccount(id) if id == unknown),
        "{e:?}"
    );
    let e = try_reserve(&mut conn, account, Uuid::now_v7(), 0)
        .await
        .unwrap_err();
    assert!(
        matches!(e, slate_events::Error::InvalidArgument(_)),
        "{e:?}"
    );
    let e = credits::capture(&mut conn, Uuid::now_v7(), &Metadata::system())
        .await
        .unwrap_err();
    assert!(matches!(e, slate_events::Error::UnknownReservation));
    // Same grant key, other amount: refused, not silently merged.
    let g = Grant {
        account_id: account,
        amount: 5,
        source: GrantSource::Goodwill,
        grant_key: "same".into(),
        stripe_object: None,
        expires_at: None,
        reason: None,
    };
    assert_eq!(
        credits::grant(&mut conn, &g, &Metadata::system())
            .await
            .unwrap()
            .outcome,
        "granted"
    );
    assert_eq!(
        credits::grant(&mut conn, &g, &Metadata::system())
            .await
            .unwrap()
            .outcome,
        "duplicate"
    );
    let e = credits::grant(&mut conn, &Grant { amount: 6, ..g }, &Metadata::system())
        .await
        .unwrap_err();
    assert!(matches!(e, slate_events::Error::KeyReused));
}

/// The balance is one statement (totals and buckets together): an account
/// without a bucket reads as zero with none listed, an unknown account is
/// its typed error, and buckets come soonest expiry first, then in grant
/// order, those that never expire last.
#[tokio::test]
async fn a_balance_lists_buckets_soonest_expiry_first_and_none_for_a_new_account() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (0, 0, 0));
    assert!(b.buckets.is_empty(), "{b:?}");
    let unknown = Uuid::now_v7();
    let e = credits::balance(&mut conn, unknown).await.unwrap_err();
    assert!(
        matches!(e, slate_events::Error::UnknownAccount(id) if id == unknown),
        "{e:?}"
    );
    let soon = Utc::now() + Duration::days(3);
    let later = Utc::now() + Duration::days(30);
    let never = grant(&mut conn, account, 5, GrantSource::Purchase, None).await;
    let late = grant(&mut conn, account, 7, GrantSource::Purchase, Some(later)).await;
    let early = grant(&mut conn, account, 11, GrantSource::Purchase, Some(soon)).await;
    let never_too = grant(&mut conn, account, 13, GrantSource::Purchase, None).await;
    reserve(&mut conn, account, 4).await;
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved, b.debt), (32, 4, 0));
    let order: Vec<(Uuid, i64, i64)> = b
        .buckets
        .iter()
        .map(|k| (k.bucket_id, k.remaining, k.reserved))
        .collect();
    assert_eq!(
        order,
        [
            (early, 7, 4),
            (late, 7, 0),
            (never, 5, 0),
            (never_too, 13, 0)
        ]
    );
}

/// granted = available + reserved + captured + lapsed + revoked + debt settled.
pub async fn assert_invariant(conn: &mut PgConnection, account: Uuid) {
    let row: (i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "select total_granted, available, reserved, total_captured, total_lapsed, total_revoked,
                total_debt_settled from credit_accounts where account_id = $1",
    )
    .bind(account)
    .fetch_one(conn)
    .await
    .unwrap();
    let (granted, available, reserved, captured, lapsed, revoked, settled) = row;
    assert_eq!(
        granted,
        available + reserved + captured + lapsed + revoked + settled,
        "ledger identity broken for {account}: {row:?}"
    );
}
