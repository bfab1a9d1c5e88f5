//! Gap safety, rebuild and verify.

use std::process::Command;

use chrono::{Duration, Utc};
use slate_events::catalog::GrantSource;
use slate_events::credits::{self, Reservation};
use slate_events::projections::{self, Projection};
use slate_events::{Actor, Metadata};
use uuid::Uuid;

use crate::credits::{assert_invariant, grant, new_account, reserve};
use crate::harness::{Rng, TestDb};

async fn ledger_positions(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("select global_position from credit_ledger_entries order by global_position")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// The log position of the grant that made `bucket`.
async fn grant_position(conn: &mut sqlx::PgConnection, bucket: Uuid) -> i64 {
    sqlx::query_scalar("select global_position from events where payload->>'bucket_id' = $1")
        .bind(bucket.to_string())
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_transactions_event_is_not_skipped_by_the_projector() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let slow_account = new_account(&mut conn).await;
    let fast_account = new_account(&mut conn).await;
    drop(conn);
    db.settle_projections().await;

    // The slow transaction appends first (lower position) and stays open.
    let mut slow = db.pool.begin().await.unwrap();
    let slow_bucket = grant(&mut slow, slow_account, 5, GrantSource::Purchase, None).await;
    let slow_pos = grant_position(&mut slow, slow_bucket).await;

    // A later append commits while it is open.
    let mut conn = db.conn().await;
    let fast_bucket = grant(&mut conn, fast_account, 7, GrantSource::Purchase, None).await;
    let fast_pos = grant_position(&mut conn, fast_bucket).await;
    assert!(fast_pos > slow_pos);
    // A reader checkpointing "the last position seen" would now see fast_pos
    // and move past slow_pos for good.
    let visible: Vec<i64> =
        sqlx::query_scalar("select global_position from events where global_position >= $1")
            .bind(slow_pos)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(visible, vec![fast_pos]);

    // The projector does not move past the open transaction.
    projections::catch_up(&db.pool, Projection::CreditLedger)
        .await
        .unwrap();
    assert!(!ledger_positions(&db).await.contains(&fast_pos));

    slow.commit().await.unwrap();
    db.settle_projections().await;
    let seen = ledger_positions(&db).await;
    assert!(seen.contains(&slow_pos), "slow event skipped: {seen:?}");
    assert!(seen.contains(&fast_pos));
    assert!(
        projections::verify(&db.pool, Projection::ALL)
            .await
            .unwrap()
            .is_clean()
    );
}

/// A randomized mix of every ledger operation over several accounts.
async fn random_workload(db: &TestDb, seed: u64, steps: usize) -> Vec<Uuid> {
    let mut rng = Rng::new(seed);
    let mut conn = db.conn().await;
    let mut accounts = Vec::new();
    for _ in 0..4 {
        accounts.push(new_account(&mut conn).await);
    }
    let mut open: Vec<Uuid> = Vec::new();
    let mut buckets: Vec<(Uuid, Uuid)> = Vec::new();
    let t0 = Utc::now();
    for step in 0..steps {
        let account = *rng.pick(&accounts);
        match rng.range(0, 100) {
            0..=19 => {
                let source = *rng.pick(&[
                    GrantSource::Purchase,
                    GrantSource::Promotion,
                    GrantSource::Subscription,
                ]);
                let expiry =
                    (rng.range(0, 3) == 0).then(|| t0 + Duration::minutes(rng.range(1, 120)));
                let b = grant(&mut conn, account, rng.range(1, 60), source, expiry).await;
                buckets.push((account, b));
            }
            20..=54 => {
                let hold = t0 + Duration::minutes(rng.range(10, 200));
                let g = Uuid::now_v7();
                let r = credits::reserve(
                    &mut conn,
                    account,
                    g,
                    rng.range(1, 25),
                    hold,
                    t0,
                    &Metadata::system(),
                )
                .await
                .unwrap();
                if matches!(r, Reservation::Reserved { .. }) {
                    open.push(g);
                }
            }
            55..=74 if !open.is_empty() => {
                let g = open.swap_remove(rng.range(0, open.len() as i64) as usize);
                credits::capture(&mut conn, g, &Metadata::system())
                    .await
                    .unwrap();
            }
            75..=89 if !open.is_empty() => {
                let g = open[rng.range(0, open.len() as i64) as usize];
                // Sometimes resolved twice: the second is a no-op.
                credits::release(&mut conn, g, "failed", &Metadata::system())
                    .await
                    .unwrap();
            }
            90..=95 if !buckets.is_empty() => {
                let (a, b) = *rng.pick(&buckets);
                credits::revoke(
                    &mut conn,
                    a,
                    b,
                    rng.range(1, 40),
                    &format!("re_{step}_{}", Uuid::new_v4().simple()),
                    Some("refund"),
                    &Metadata::by(Actor::Stripe),
                )
                .await
                .unwrap();
            }
            _ => {
                let at = t0 + Duration::minutes(rng.range(0, 240));
                drop(conn);
                slate_workers::sweeper::sweep(&db.pool, at).await.unwrap();
                conn = db.conn().await;
            }
        }
    }
    accounts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_randomized_workload_verify_finds_rebuilt_equal_to_live() {
    let db = TestDb::new().await;
    let seed = std::env::var("SLATE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_micros() as u64);
    eprintln!("randomized workload seed {seed} (SLATE_TEST_SEED replays it)");

    // Two concurrent workloads on the same database.
    let (a, b) = tokio::join!(
        random_workload(&db, seed, 300),
        random_workload(&db, seed ^ 0xabcdef, 300)
    );
    db.settle_projections().await;

    let mut conn = db.conn().await;
    for account in a.iter().chain(&b) {
        assert_invariant(&mut conn, *account).await;
    }
    let report = projections::verify(&db.pool, Projection::ALL)
        .await
        .unwrap();
    assert!(report.is_clean(), "{report:#?}");
    assert!(report.events_replayed > 300);

    // The operator command agrees (exit code 0).
    let out = Command::new(env!("CARGO_BIN_EXE_slate"))
        .args(["projections", "verify"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("all projections match the log"), "{stdout}");

    // Rebuilding from the log reproduces the same state.
    let before: Vec<(Uuid, i64, i64, i64)> = sqlx::query_as(
        "select account_id, available, reserved, debt from credit_accounts order by account_id",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let indexes = "select string_agg(indexdef, ';' order by indexname) from pg_indexes
                    where schemaname = current_schema()";
    let indexes_before: String = sqlx::query_scalar(indexes)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    for &p in Projection::ALL {
        projections::rebuild(&db.pool, p).await.unwrap();
    }
    let indexes_after: String = sqlx::query_scalar(indexes)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        indexes_before, indexes_after,
        "a rebuild recreates the indexes it drops"
    );
    let after: Vec<(Uuid, i64, i64, i64)> = sqlx::query_as(
        "select account_id, available, reserved, debt from credit_accounts order by account_id",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(before, after);
    assert!(
        projections::verify(&db.pool, Projection::ALL)
            .await
            .unwrap()
            .is_clean()
    );
}

#[tokio::test]
async fn verify_reports_a_tampered_projection_and_exits_non_zero() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    grant(&mut conn, account, 10, GrantSource::Purchase, None).await;
    reserve(&mut conn, account, 3).await;
    db.settle_projections().await;
    assert!(
        projections::verify(&db.pool, Projection::ALL)
            .await
            .unwrap()
            .is_clean()
    );

    sqlx::query("update credit_accounts set available = available + 1 where account_id = $1")
        .bind(account)
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("delete from credit_ledger_entries where event_type = 'CreditsReserved'")
        .execute(&mut *conn)
        .await
        .unwrap();
    let report = projections::verify(&db.pool, Projection::ALL)
        .await
        .unwrap();
    assert!(!report.is_clean());
    let bad: Vec<_> = report
        .tables
        .iter()
        .filter(|t| !t.is_clean())
        .map(|t| t.table)
        .collect();
    assert_eq!(bad, vec!["credit_accounts", "credit_ledger_entries"]);

    let out = Command::new(env!("CARGO_BIN_EXE_slate"))
        .args(["projections", "verify"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("DIFFERENT"));

    // `rebuild` repairs both from the log.
    let out = Command::new(env!("CARGO_BIN_EXE_slate"))
        .args(["projections", "rebuild"])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        projections::verify(&db.pool, Projection::ALL)
            .await
            .unwrap()
            .is_clean()
    );
    let b = credits::balance(&mut conn, account).await.unwrap();
    assert_eq!((b.available, b.reserved), (7, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_one_projector_leads_and_another_takes_over_when_it_stops() {
    let db = TestDb::new().await;
    let (stop_a, rx_a) = tokio::sync::watch::channel(false);
    let (stop_b, rx_b) = tokio::sync::watch::channel(false);
    let a = tokio::spawn(projections::run_projector(
        db.pool.clone(),
        Projection::CreditLedger,
        slate_events::tail::watch(db.pool.clone(), slate_events::tail::INTERVAL),
        rx_a,
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let b = tokio::spawn(projections::run_projector(
        db.pool.clone(),
        Projection::CreditLedger,
        slate_events::tail::watch(db.pool.clone(), slate_events::tail::INTERVAL),
        rx_b,
    ));

    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    for _ in 0..20 {
        grant(&mut conn, account, 1, GrantSource::Promotion, None).await;
    }
    let leaders: i64 = sqlx::query_scalar(
        "select count(*) from pg_locks where locktype = 'advisory' and granted and database =
           (select oid from pg_database where datname = current_database())",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(leaders, 1);
    wait_for_ledger(&db, 20).await;

    stop_a.send(true).unwrap();
    a.await.unwrap();
    for _ in 0..5 {
        grant(&mut conn, account, 1, GrantSource::Promotion, None).await;
    }
    wait_for_ledger(&db, 25).await;
    stop_b.send(true).unwrap();
    b.await.unwrap();
    assert!(
        projections::verify(&db.pool, Projection::ALL)
            .await
            .unwrap()
            .is_clean()
    );
}

async fn wait_for_ledger(db: &TestDb, n: i64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let c: i64 = sqlx::query_scalar("select count(*) from credit_ledger_entries")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if c == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ledger has {c} entries, want {n}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A projector whose shutdown sender is gone (its process's job monitor
/// ended) stops, instead of spinning on a `changed()` that answers at once
/// for ever (seen in the chaos soak: thousands of loops a second).
#[tokio::test]
async fn a_projector_stops_when_its_shutdown_sender_is_dropped() {
    let db = TestDb::new().await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(projections::run_projector(
        db.pool.clone(),
        Projection::CreditLedger,
        slate_events::tail::watch(db.pool.clone(), slate_events::tail::INTERVAL),
        rx,
    ));
    drop(stop);
    tokio::time::timeout(std::time::Duration::from_secs(30), task)
        .await
        .expect("the projector stops once nobody can stop it any more")
        .unwrap();
}

/// A full rebuild of the audit log writes in bulk (binary COPY from a second
/// connection), the projector row by row (`unnest`): both give the same
/// entries, in the same order, with odd metadata and a retention cutoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bulk_audit_rebuild_writes_what_the_projector_wrote() {
    use slate_events::catalog::{AuthenticationFailed, DomainEvent, StaffRead};
    use slate_events::store::{self, ExpectedVersion, NewEvent};

    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    grant(&mut conn, account, 10, GrantSource::Purchase, None).await;
    let odd = "tab\there, line\nbreak, \"quoted\", back\\slash, NUL-free ünïcødé \u{202e}";
    for i in 0..30 {
        let mut meta = Metadata::by(if i % 2 == 0 {
            Actor::User {
                account_id: account,
            }
        } else {
            Actor::Operator {
                name: format!("op {odd}"),
            }
        });
        meta.impersonator = (i % 3 == 0).then(Uuid::now_v7);
        meta.request_id = (i % 4 != 0).then(|| format!("req-{i} {odd}"));
        meta.stripe_event_id = (i % 5 == 0).then(|| format!("evt_{i}"));
        meta.api_key_id = (i % 2 == 1).then(Uuid::now_v7);
        meta.ip = Some("203.0.113.7".into());
        meta.user_agent = (i % 3 != 1).then(|| odd.to_owned());
        let event = if i % 2 == 0 {
            DomainEvent::StaffRead(StaffRead {
                staff_id: Uuid::now_v7(),
                account_id: account,
                what: odd.into(),
            })
        } else {
            DomainEvent::AuthenticationFailed(AuthenticationFailed {
                reason: odd.into(),
                key_prefix: None,
                ip: Some("203.0.113.7".into()),
                route: "/v1/x".into(),
            })
        };
        store::append(
            &mut conn,
            &format!("bulk-{i}"),
            ExpectedVersion::Any,
            &[NewEvent::new(event, meta)],
        )
        .await
        .unwrap();
    }
    // Metadata the typed reader would refuse, and events older than the
    // retention cutoff (no entry for them).
    sqlx::query(
        "insert into events (event_id, stream_id, stream_version, event_type, schema_version,
                             payload, metadata, recorded_at)
         values (gen_random_uuid(), 'bulk-odd-1', 1, 'StaffRead', 1,
                 jsonb_build_object('staff_id', gen_random_uuid(), 'account_id', gen_random_uuid(), 'what', 'x'),
                 '{\"actor\": {\"kind\": 7}, \"request_id\": 5, \"impersonator\": \"not a uuid\"}', now()),
                (gen_random_uuid(), 'bulk-old-1', 1, 'StaffRead', 1,
                 jsonb_build_object('staff_id', gen_random_uuid(), 'account_id', gen_random_uuid(), 'what', 'old'),
                 '{}', now() - interval '2 years'),
                (gen_random_uuid(), 'bulk-odd-2', 1, 'StaffRead', 1,
                 jsonb_build_object('staff_id', gen_random_uuid(), 'account_id', gen_random_uuid(), 'what', 'y'),
                 '{}', now())",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("update audit_retention set cutoff = now() - interval '18 months'")
        .execute(&mut *conn)
        .await
        .unwrap();
    db.settle_projections().await;

    let entries = "select row_to_json(x)::text from (
                     select position, event_id, at, actor_kind, actor_id, impersonator, action,
                            account_id, targets, outcome, request_id, reason, api_key_id, ip,
                            user_agent
                       from audit_entries order by seq) x";
    let live: Vec<String> = sqlx::query_scalar(entries)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let events: i64 = sqlx::query_scalar("select count(*) from events")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        live.len() as i64,
        events - 1,
        "one event is past the cutoff"
    );
    assert!(live.iter().any(|e| e.contains("tab\\there")));

    let rebuilt = projections::rebuild(&db.pool, Projection::AuditLog)
        .await
        .unwrap();
    assert_eq!(rebuilt as i64, events);
    let after: Vec<String> = sqlx::query_scalar(entries)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert_eq!(live, after);
    let (checkpoint, applied): (i64, i64) = sqlx::query_as(
        "select last_position, events_applied from projection_checkpoints where projection = 'audit_log'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let last: i64 = sqlx::query_scalar(
        "select global_position from events order by transaction_id desc, global_position desc limit 1",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!((checkpoint, applied), (last, events));
    let report = projections::verify(&db.pool, &[Projection::AuditLog])
        .await
        .unwrap();
    assert!(report.is_clean(), "{report:#?}");

    // The projector carries on after the bulk checkpoint.
    grant(&mut conn, account, 1, GrantSource::Purchase, None).await;
    db.settle_projections().await;
    let more: i64 = sqlx::query_scalar("select count(*) from audit_entries")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(more > after.len() as i64);
}

/// A process that closes its pool (shutting down) ends its tail watch: the
/// receivers see it close, and nothing warns once a second about a closed
/// pool.
#[tokio::test]
async fn the_tail_watch_ends_when_its_pool_is_closed() {
    let db = TestDb::new().await;
    let pool = slate_events::db::pool_options()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let mut tail = slate_events::tail::watch(pool.clone(), slate_events::tail::INTERVAL);
    let mut conn = db.conn().await;
    new_account(&mut conn).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), tail.changed())
        .await
        .expect("the watch sees the new event")
        .expect("the watch is open while the pool is");
    pool.close().await;
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while tail.changed().await.is_ok() {}
    })
    .await;
    assert!(closed.is_ok(), "the watch closes once its pool is closed");
}

/// Append `n` events no projection but the audit log reads, in one
/// transaction; returns the last one's position.
async fn append_others(conn: &mut sqlx::PgConnection, n: i64) -> i64 {
    append_of_type(conn, "StaffRead", n).await
}

/// `n` events of `event_type` (a staff read's payload), one transaction;
/// the last one's position.
async fn append_of_type(conn: &mut sqlx::PgConnection, event_type: &str, n: i64) -> i64 {
    sqlx::query_scalar(
        "with added as (
           insert into events (event_id, stream_id, stream_version, event_type, schema_version,
                               payload, metadata)
           select gen_random_uuid(), 'others-' || gen_random_uuid(), 1, $2, 1,
                  jsonb_build_object('staff_id', gen_random_uuid(),
                                     'account_id', gen_random_uuid(), 'what', 'x'),
                  '{}'
             from generate_series(1, $1)
           returning global_position)
         select max(global_position) from added",
    )
    .bind(n)
    .bind(event_type)
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

async fn ledger_checkpoint(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "select coalesce((select last_position from projection_checkpoints
                           where projection = 'credit_ledger'), 0)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Skip until the ledger's checkpoint is at `target`. Other tests' open
/// transactions on the server can hold back the horizon for a while, so it
/// retries (bounded); no skip may pass more than one walk.
async fn skip_to(db: &TestDb, target: i64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while ledger_checkpoint(db).await != target {
        let passed = projections::skip_ahead(&db.pool, Projection::CreditLedger)
            .await
            .unwrap();
        assert!(passed <= projections::SKIP_WALK, "{passed}");
        if passed == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "checkpoint at {} after 30 s, not {target}",
                ledger_checkpoint(db).await
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A projection whose types stop appearing keeps its checkpoint near the
/// log's tail all the same: a skip moves it over other types' events, at
/// most one walk at a time, and never over an event of its own types nor
/// into a transaction still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_skip_moves_a_checkpoint_over_other_types_only() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = new_account(&mut conn).await;
    grant(&mut conn, account, 5, GrantSource::Purchase, None).await;
    db.settle_projections().await;
    let start = ledger_checkpoint(&db).await;
    assert!(start > 0);

    // Too few to be worth a write.
    let few = append_others(&mut conn, projections::SKIP_MIN / 2).await;
    assert_eq!(
        projections::skip_ahead(&db.pool, Projection::CreditLedger)
            .await
            .unwrap(),
        0
    );
    assert_eq!(ledger_checkpoint(&db).await, start);

    // More than a walk: two skips (or more, while the horizon is held back).
    let many = append_others(&mut conn, projections::SKIP_WALK + projections::SKIP_MIN).await;
    assert!(many > few);
    skip_to(&db, many).await;

    // One of its own types ahead: no skip passes it; the projector applies
    // it, and the skip carries on after it.
    append_others(&mut conn, projections::SKIP_MIN).await;
    let bucket = grant(&mut conn, account, 3, GrantSource::Purchase, None).await;
    let own = grant_position(&mut conn, bucket).await;
    let after_own = append_others(&mut conn, projections::SKIP_MIN).await;
    for _ in 0..3 {
        projections::skip_ahead(&db.pool, Projection::CreditLedger)
            .await
            .unwrap();
        assert!(ledger_checkpoint(&db).await < own);
    }
    // Applied once the horizon has passed it: a transaction open anywhere
    // on the server (another test's) holds the horizon back, as in
    // `skip_to`. (A single catch-up failed here when one was.)
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        projections::catch_up(&db.pool, Projection::CreditLedger)
            .await
            .unwrap();
        if ledger_positions(&db).await.contains(&own) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "its own event at {own} not applied after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    skip_to(&db, after_own).await;

    // An open transaction holds an event of its types: the skip stops
    // before that transaction, however many events commit after it.
    let before_open = append_others(&mut conn, projections::SKIP_MIN).await;
    let mut open = db.pool.begin().await.unwrap();
    grant(&mut open, account, 2, GrantSource::Purchase, None).await;
    let after_open = append_others(&mut conn, projections::SKIP_MIN).await;
    skip_to(&db, before_open).await;
    for _ in 0..3 {
        projections::skip_ahead(&db.pool, Projection::CreditLedger)
            .await
            .unwrap();
        assert_eq!(ledger_checkpoint(&db).await, before_open);
    }
    open.commit().await.unwrap();
    db.settle_projections().await;
    skip_to(&db, after_open).await;
    assert!(
        projections::verify(&db.pool, &[Projection::CreditLedger])
            .await
            .unwrap()
            .is_clean()
    );
}

/// When PostgreSQL reads a projector's batch through an index of event
/// types rather than the log-order one (it prefers that for rare types), the
/// checkpoint is an index condition there too: a projection whose types
/// are all behind its checkpoint reads none of them to find its batch
/// empty. (Through `events_type_idx`, whose second column is the position,
/// it read every event of its types ever written, at every poll.)
#[tokio::test]
async fn an_empty_batch_reads_no_event_of_its_types_behind_the_checkpoint() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let p = Projection::CreditLedger;
    let last = append_of_type(&mut conn, p.event_types()[0], 2_000).await;
    sqlx::query(
        "insert into projection_checkpoints (projection, last_transaction_id, last_position)
         select $1, transaction_id, global_position from events where global_position = $2
         on conflict (projection) do update
            set last_transaction_id = excluded.last_transaction_id,
                last_position = excluded.last_position",
    )
    .bind(p.name())
    .bind(last)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("analyze events")
        .execute(&mut *conn)
        .await
        .unwrap();
    let valid: bool = sqlx::query_scalar(
        "select indisvalid from pg_index where indexrelid = 'events_type_transaction_idx'::regclass",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!(valid);

    // Without the log-order index (this test's database only, rolled back),
    // the planner has only the type indexes to choose from.
    let mut tx = db.pool.begin().await.unwrap();
    for s in [
        "drop index events_transaction_position_idx",
        "set local enable_seqscan = off",
        "set local enable_bitmapscan = off",
    ] {
        sqlx::query(s).execute(&mut *tx).await.unwrap();
    }
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "explain (analyze, format json) {}",
        projections::batch_statement()
    )))
    .bind(p.name())
    .bind(p.event_types())
    .bind(500i64)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();

    let mut scans = Vec::new();
    let mut todo = vec![&plan[0]["Plan"]];
    while let Some(node) = todo.pop() {
        if node["Relation Name"] == "events" {
            scans.push(node);
        }
        if let Some(children) = node["Plans"].as_array() {
            todo.extend(children);
        }
    }
    assert_eq!(scans.len(), 1, "{plan}");
    let scan = scans[0];
    assert_eq!(scan["Index Name"], "events_type_transaction_idx", "{plan}");
    assert_eq!(scan["Actual Rows"], 0, "{plan}");
    assert_eq!(
        scan["Rows Removed by Filter"].as_i64().unwrap_or(0),
        0,
        "{plan}"
    );
}

/// A leader looks before it takes the checkpoint row: an empty poll is one
/// read outside any transaction, so it neither waits for the row nor takes
/// it (taking it gave each empty poll a transaction id, a WAL record and a
/// commit to flush). With events to apply, the poll takes the row and
/// applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_poll_neither_waits_for_nor_takes_the_checkpoint_row() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let p = Projection::CreditLedger;
    let account = new_account(&mut conn).await;
    grant(&mut conn, account, 5, GrantSource::Purchase, None).await;
    db.settle_projections().await;
    let start = ledger_checkpoint(&db).await;
    assert!(!projections::has_batch(&db.pool, p).await.unwrap());

    // Holding the checkpoints' table rather than the row: a row lock would
    // give the holder a transaction id, and hold back the gap-safe horizon
    // under the events below.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("lock table projection_checkpoints in exclusive mode")
        .execute(&mut *holder)
        .await
        .unwrap();
    let wait = std::time::Duration::from_secs(5);
    let polled = tokio::time::timeout(wait, projections::poll(&db.pool, p, 500)).await;
    assert_eq!(
        polled.expect("an empty poll waited for the row").unwrap(),
        0
    );
    // A batch taken without looking first waits for the row. (On a pool of
    // its own: the abandoned statement keeps its connection busy until the
    // holder lets go.)
    let short = std::time::Duration::from_millis(300);
    let aside = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*db.pool.connect_options()).clone())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(short, projections::run_batch(&aside, p, 500))
            .await
            .is_err()
    );

    // Something to apply: the poll takes the row (so waits for it) and
    // applies it once the holder lets go.
    let bucket = grant(&mut conn, account, 3, GrantSource::Purchase, None).await;
    let own = grant_position(&mut conn, bucket).await;
    // Other tests' open transactions can hold back the horizon a while.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !projections::has_batch(&db.pool, p).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the grant stayed behind the horizon"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pool = db.pool.clone();
    let pending = tokio::spawn(async move { projections::poll(&pool, p, 500).await });
    tokio::time::sleep(short).await;
    assert!(!pending.is_finished());
    holder.rollback().await.unwrap();
    assert!(pending.await.unwrap().unwrap() > 0);
    aside.close().await;
    assert!(ledger_checkpoint(&db).await > start);
    assert!(ledger_positions(&db).await.contains(&own));
    assert!(!projections::has_batch(&db.pool, p).await.unwrap());
}
