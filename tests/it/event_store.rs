use std::sync::Arc;

use slate_events::catalog::{AccountCreated, DomainEvent};
use slate_events::store::{self, ExpectedVersion, NewEvent};
use slate_events::{Error, Metadata};
use uuid::Uuid;

use crate::harness::TestDb;

fn account_event(account_id: Uuid) -> NewEvent {
    NewEvent::new(
        DomainEvent::AccountCreated(AccountCreated {
            account_id,
            email: format!("{account_id}@example.com"),
            staff: false,
        }),
        Metadata::system(),
    )
}

/// `writers` writers, each in its own transaction, append `events_each` new
/// events to `stream` at the same moment, expecting `expected`; each commits
/// if its append succeeded. Their results, in no particular order.
async fn racing_appends(
    db: &TestDb,
    writers: usize,
    stream: &'static str,
    expected: ExpectedVersion,
    events_each: usize,
) -> Vec<Result<store::Appended, Error>> {
    let barrier = Arc::new(tokio::sync::Barrier::new(writers));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (pool, barrier) = (db.pool.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
            barrier.wait().await;
            let events: Vec<NewEvent> = (0..events_each)
                .map(|_| account_event(Uuid::now_v7()))
                .collect();
            let r = store::append(&mut tx, stream, expected, &events).await;
            if r.is_ok() {
                tx.commit().await.unwrap();
            }
            r
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicting_appends_at_the_same_version_exactly_one_wins() {
    let db = TestDb::new().await;
    let stream = "test-conflict";
    let mut conn = db.conn().await;
    store::append(
        &mut conn,
        stream,
        ExpectedVersion::NoStream,
        &[account_event(Uuid::now_v7())],
    )
    .await
    .unwrap();
    drop(conn);

    // 16 writers all believe the stream is at version 1.
    let mut won = 0;
    let mut conflicts = 0;
    for r in racing_appends(&db, 16, stream, ExpectedVersion::Exact(1), 2).await {
        match r {
            Ok(a) => {
                won += 1;
                assert_eq!(a.version, 3);
            }
            Err(Error::Conflict { .. }) => conflicts += 1,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert_eq!((won, conflicts), (1, 15));
    let mut conn = db.conn().await;
    let events = store::read_stream(&mut conn, stream).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[tokio::test]
async fn a_stale_expected_version_is_a_typed_conflict_and_writes_nothing() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    store::append(
        &mut conn,
        "s",
        ExpectedVersion::NoStream,
        &[account_event(Uuid::now_v7())],
    )
    .await
    .unwrap();
    let err = store::append(
        &mut conn,
        "s",
        ExpectedVersion::NoStream,
        &[account_event(Uuid::now_v7())],
    )
    .await
    .unwrap_err();
    match err {
        Error::Conflict { actual, .. } => assert_eq!(actual, 1),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let err = store::append(
        &mut conn,
        "s",
        ExpectedVersion::Exact(5),
        &[account_event(Uuid::now_v7())],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }));
    assert!(err.is_retryable());
    assert_eq!(store::read_stream(&mut conn, "s").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_event_id_appended_twice_stores_one_event() {
    let db = TestDb::new().await;
    let event = account_event(Uuid::now_v7());
    let mut conn = db.conn().await;
    let first = store::append(
        &mut conn,
        "dup",
        ExpectedVersion::Any,
        std::slice::from_ref(&event),
    )
    .await
    .unwrap();
    assert!(!first.duplicate);
    // A retry, even with the expected version it had the first time.
    let again = store::append(
        &mut conn,
        "dup",
        ExpectedVersion::NoStream,
        std::slice::from_ref(&event),
    )
    .await
    .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.positions, first.positions);

    // Concurrent retries of one batch: still one copy.
    let batch = vec![account_event(Uuid::now_v7()), account_event(Uuid::now_v7())];
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let pool = db.pool.clone();
        let batch = batch.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            // A retry after a conflict is how a caller resolves a race.
            for _ in 0..10 {
                match store::append(&mut conn, "dup2", ExpectedVersion::Any, &batch).await {
                    Ok(a) => return a,
                    Err(e) if e.is_retryable() => continue,
                    Err(e) => panic!("{e:?}"),
                }
            }
            panic!("no progress");
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        if !t.await.unwrap().duplicate {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
    let count: i64 =
        sqlx::query_scalar("select count(*) from events where stream_id in ('dup', 'dup2')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(count, 3);
}

#[tokio::test]
async fn several_events_append_atomically_inside_the_callers_transaction() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
    let a = store::append(
        &mut tx,
        "atomic",
        ExpectedVersion::NoStream,
        &[
            account_event(Uuid::now_v7()),
            account_event(Uuid::now_v7()),
            account_event(Uuid::now_v7()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(a.version, 3);
    // A conflict inside the transaction leaves it usable (savepoint).
    assert!(
        store::append(
            &mut tx,
            "atomic",
            ExpectedVersion::Exact(1),
            &[account_event(Uuid::now_v7())]
        )
        .await
        .is_err()
    );
    tx.rollback().await.unwrap();
    assert!(
        store::read_stream(&mut conn, "atomic")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn update_delete_and_truncate_on_events_are_refused_by_the_database() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    store::append(
        &mut conn,
        "immutable",
        ExpectedVersion::Any,
        &[account_event(Uuid::now_v7())],
    )
    .await
    .unwrap();
    for sql in [
        "update events set payload = '{}'",
        "delete from events",
        "truncate events",
        "update events set event_type = 'X' where stream_id = 'immutable'",
    ] {
        let err = sqlx::query(sql).execute(&mut *conn).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("SL001"), "{sql}");
        assert!(db_err.message().contains("append-only"));
    }
    assert_eq!(
        store::read_stream(&mut conn, "immutable")
            .await
            .unwrap()
            .len(),
        1
    );
}

/// Group commit: concurrent callers share transactions, yet each gets the
/// outcome it would have had alone — appended, duplicate, conflict, key
/// reused — and a race on one stream neither loses nor doubles an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_gives_each_caller_its_own_outcome() {
    use slate_events::batch::BatchOptions;
    let db = TestDb::new().await;
    let group = store::GroupCommit::start(
        db.pool.clone(),
        BatchOptions {
            writers: 2,
            max_batch: 16,
        },
    );
    // 64 new streams at once, plus 16 appends that all race to version 1 of
    // one stream, plus one multi-event append.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let group = group.clone();
        tasks.push(tokio::spawn(async move {
            group
                .append(
                    &format!("gc-{i}"),
                    ExpectedVersion::NoStream,
                    vec![account_event(Uuid::now_v7())],
                )
                .await
        }));
    }
    let mut racers = Vec::new();
    for _ in 0..16 {
        let group = group.clone();
        racers.push(tokio::spawn(async move {
            group
                .append(
                    "gc-contended",
                    ExpectedVersion::NoStream,
                    vec![account_event(Uuid::now_v7())],
                )
                .await
        }));
    }
    let multi = group
        .append(
            "gc-multi",
            ExpectedVersion::Any,
            vec![
                account_event(Uuid::now_v7()),
                account_event(Uuid::now_v7()),
                account_event(Uuid::now_v7()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(multi.version, 3);
    assert_eq!(multi.positions.len(), 3);
    for t in tasks {
        let a = t.await.unwrap().unwrap();
        assert_eq!(a.version, 1);
        assert!(!a.duplicate);
        assert_eq!(a.positions.len(), 1);
    }
    let (mut won, mut conflicts) = (0, 0);
    for t in racers {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(Error::Conflict { actual, .. }) => {
                assert_eq!(actual, 1);
                conflicts += 1
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((won, conflicts), (1, 15));

    // Retrying a stored event is a duplicate; its id on another stream is a
    // reused key; a stale expected version is a conflict.
    let event = account_event(Uuid::now_v7());
    let first = group
        .append("gc-retry", ExpectedVersion::NoStream, vec![event.clone()])
        .await
        .unwrap();
    let again = group
        .append("gc-retry", ExpectedVersion::NoStream, vec![event.clone()])
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.positions, first.positions);
    assert!(matches!(
        group
            .append("gc-elsewhere", ExpectedVersion::Any, vec![event])
            .await,
        Err(Error::KeyReused)
    ));
    assert!(matches!(
        group
            .append(
                "gc-retry",
                ExpectedVersion::Exact(5),
                vec![account_event(Uuid::now_v7())]
            )
            .await,
        Err(Error::Conflict { actual: 1, .. })
    ));

    let mut conn = db.conn().await;
    let stored: i64 = sqlx::query_scalar("select count(*) from events where stream_id like 'gc-%'")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(stored, 64 + 1 + 3 + 1);
    let batches: i64 = sqlx::query_scalar(
        "select count(distinct transaction_id) from events where stream_id ~ '^gc-[0-9]+$'",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!(
        batches < 64,
        "64 concurrent appends took {batches} transactions"
    );
}

/// One group-commit batch as `slate_append_batch` sees it, with what the
/// set-based INSERT must leave to the one-by-one path: a stream's later
/// item, an event id another item of the batch already took, several
/// events in one item, a stale expected version, a retried event.
#[tokio::test]
async fn a_batch_gives_every_item_the_outcome_it_would_have_alone() {
    async fn batch(
        db: &TestDb,
        items: &[(&str, ExpectedVersion, Vec<NewEvent>)],
    ) -> Vec<store::BatchRow> {
        let items: Vec<store::PendingAppend> = items
            .iter()
            .map(|(stream_id, expected, events)| store::PendingAppend {
                stream_id: (*stream_id).to_owned(),
                expected: *expected,
                events: events.clone(),
            })
            .collect();
        store::append_batch(&db.pool, &items).await.unwrap()
    }
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let first = account_event(Uuid::now_v7());
    let rows = batch(
        &db,
        &[
            ("sb-a", ExpectedVersion::NoStream, vec![first.clone()]),
            (
                "sb-a",
                ExpectedVersion::Any,
                vec![account_event(Uuid::now_v7())],
            ),
            ("sb-b", ExpectedVersion::Any, vec![first.clone()]),
            (
                "sb-c",
                ExpectedVersion::NoStream,
                (0..3).map(|_| account_event(Uuid::now_v7())).collect(),
            ),
            (
                "sb-d",
                ExpectedVersion::Exact(7),
                vec![account_event(Uuid::now_v7())],
            ),
            (
                "sb-e",
                ExpectedVersion::NoStream,
                vec![account_event(Uuid::now_v7())],
            ),
        ],
    )
    .await;
    // (item, status, version): rows come in item order, counted from 1.
    let outcomes = |rows: &[store::BatchRow]| -> Vec<(i32, String, Option<i32>)> {
        (1..)
            .zip(rows)
            .map(|(item, r)| (item, r.status.clone(), r.version))
            .collect()
    };
    assert_eq!(
        outcomes(&rows),
        [
            (1, "appended".to_owned(), Some(1)),
            (2, "appended".to_owned(), Some(2)),
            (3, "key_reused".to_owned(), None),
            (4, "appended".to_owned(), Some(3)),
            (5, "conflict".to_owned(), Some(0)),
            (6, "appended".to_owned(), Some(1)),
        ]
    );
    let positions = |i: usize| rows[i].positions.clone().unwrap_or_default();
    assert_eq!(positions(0).len(), 1);
    assert!(
        positions(1)[0] > positions(0)[0],
        "a stream's versions follow its positions"
    );
    assert_eq!(positions(3).len(), 3);
    let stored: Vec<(String, i32)> = sqlx::query_as(
        "select stream_id, stream_version from events where stream_id like 'sb-%'
          order by global_position",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let mut by_stream = std::collections::BTreeMap::<String, Vec<i32>>::new();
    for (s, v) in stored {
        by_stream.entry(s).or_default().push(v);
    }
    assert_eq!(
        by_stream.into_iter().collect::<Vec<_>>(),
        [
            ("sb-a".to_owned(), vec![1, 2]),
            ("sb-c".to_owned(), vec![1, 2, 3]),
            ("sb-e".to_owned(), vec![1]),
        ]
    );

    // Retried: a duplicate with the first answer; a new stream beside it.
    let rows_again = batch(
        &db,
        &[
            ("sb-a", ExpectedVersion::NoStream, vec![first.clone()]),
            (
                "sb-f",
                ExpectedVersion::Any,
                vec![account_event(Uuid::now_v7())],
            ),
        ],
    )
    .await;
    assert_eq!(
        outcomes(&rows_again),
        [
            (1, "duplicate".to_owned(), Some(1)),
            (2, "appended".to_owned(), Some(1))
        ]
    );
    assert_eq!(rows_again[0].positions, rows[0].positions);
}

/// The one-event path of `slate_append_events` (nearly every append) reads
/// the stream's version and inserts, and probes the event id only when that
/// did not write: each outcome, its precedence, and races between writers
/// inside their own transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_event_appends_report_each_outcome_and_settle_races() {
    // 24 writers hold a connection each at once.
    let db = TestDb::with_pool_size(32).await;
    let mut conn = db.conn().await;
    let event = account_event(Uuid::now_v7());
    let first = store::append(
        &mut conn,
        "one",
        ExpectedVersion::NoStream,
        std::slice::from_ref(&event),
    )
    .await
    .unwrap();
    assert_eq!((first.version, first.duplicate), (1, false));
    // A stored id wins over a stale expected version: a retry is a duplicate
    // with the first answer, whatever version it expects.
    for expected in [
        ExpectedVersion::NoStream,
        ExpectedVersion::Exact(7),
        ExpectedVersion::Any,
    ] {
        let again = store::append(&mut conn, "one", expected, std::slice::from_ref(&event))
            .await
            .unwrap();
        assert!(again.duplicate);
        assert_eq!((again.version, &again.positions), (1, &first.positions));
    }
    // The same id on another stream is a reused key, expected version or not.
    for expected in [ExpectedVersion::Any, ExpectedVersion::Exact(3)] {
        let err = store::append(&mut conn, "other", expected, std::slice::from_ref(&event))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::KeyReused), "{err:?}");
    }
    // A new event with a stale expected version: a conflict naming the
    // stream's version.
    let err = store::append(
        &mut conn,
        "one",
        ExpectedVersion::Exact(0),
        &[account_event(Uuid::now_v7())],
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::Conflict { actual: 1, .. }), "{err:?}");
    drop(conn);

    // 16 writers, each in its own transaction, all expecting version 1:
    // exactly one wins, the others get a conflict, nothing else is written.
    let (mut won, mut conflicts) = (0, 0);
    for r in racing_appends(&db, 16, "one", ExpectedVersion::Exact(1), 1).await {
        match r {
            Ok(a) => {
                assert_eq!(a.version, 2);
                won += 1;
            }
            Err(Error::Conflict { .. }) => conflicts += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!((won, conflicts), (1, 15));

    // 24 writers appending to one stream with any version, in transactions
    // held open a moment: every one lands (a race is retried), the versions
    // stay contiguous, and the same event sent by 8 of them is stored once.
    let shared = account_event(Uuid::now_v7());
    let barrier = Arc::new(tokio::sync::Barrier::new(24));
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (pool, barrier, shared) = (db.pool.clone(), barrier.clone(), shared.clone());
        tasks.push(tokio::spawn(async move {
            let event = if i < 8 {
                shared
            } else {
                account_event(Uuid::now_v7())
            };
            let mut conn = pool.acquire().await.unwrap();
            barrier.wait().await;
            for _ in 0..20 {
                let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
                match store::append(
                    &mut tx,
                    "any",
                    ExpectedVersion::Any,
                    std::slice::from_ref(&event),
                )
                .await
                {
                    Ok(a) => {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        tx.commit().await.unwrap();
                        return a;
                    }
                    Err(e) if e.is_retryable() => continue,
                    Err(e) => panic!("{e:?}"),
                }
            }
            panic!("no progress");
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        if !t.await.unwrap().duplicate {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 17);
    let mut conn = db.conn().await;
    let versions: Vec<i32> = store::read_stream(&mut conn, "any")
        .await
        .unwrap()
        .iter()
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, (1..=17).collect::<Vec<_>>());
}
