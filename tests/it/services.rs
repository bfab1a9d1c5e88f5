//! The real services the tests stand on: they must be there, and a missing
//! one fails loudly.

use slate_workers::storage::{Storage, StorageSettings};

fn s3_settings() -> StorageSettings {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    StorageSettings {
        endpoint: env("S3_ENDPOINT", "http://127.0.0.1:9000"),
        bucket: env("S3_BUCKET", "slate-media"),
        region: env("S3_REGION", "us-east-1"),
        access_key_id: env("AWS_ACCESS_KEY_ID", "slate"),
        secret_access_key: env("AWS_SECRET_ACCESS_KEY", "slate-local-secret"),
    }
}

#[tokio::test]
async fn objects_round_trip_through_the_s3_server_and_bad_signatures_are_refused() {
    let settings = s3_settings();
    let storage = Storage::new(&settings);
    storage.ensure_bucket().await.unwrap_or_else(|e| {
        panic!(
            "S3 unreachable at {} ({e:?}); scripts/services starts it",
            settings.endpoint
        )
    });
    let key = format!("users/test/collections/c/{}.txt", uuid::Uuid::new_v4());
    storage
        .put(&key, b"media bytes".to_vec(), "text/plain")
        .await
        .unwrap();
    assert_eq!(storage.get(&key).await.unwrap(), b"media bytes");

    let forged = Storage::new(&StorageSettings {
        secret_access_key: "wrong".into(),
        ..settings
    });
    assert!(
        forged.get(&key).await.is_err(),
        "the S3 server must check signatures"
    );
}

/// Deleting a prefix (an account's purge) takes every object under it, over
/// more than one page of the listing (1,000 keys), a page per request, and
/// nothing beside it: not a neighbour whose name only starts the same.
#[tokio::test]
async fn deleting_a_prefix_takes_every_page_of_it_and_nothing_else() {
    let storage = Storage::new(&s3_settings());
    storage.ensure_bucket().await.unwrap();
    let id = uuid::Uuid::new_v4();
    let prefix = format!("users/{id}/");
    let neighbour = format!("users/{id}x/kept.txt");
    storage
        .put(&neighbour, b"kept".to_vec(), "text/plain")
        .await
        .unwrap();
    let keys: Vec<String> = (0..1_050)
        .map(|i| format!("{prefix}c/{i:04}.txt"))
        .collect();
    futures::future::try_join_all(keys.chunks(50).map(|chunk| {
        let storage = storage.clone();
        async move {
            for key in chunk {
                storage.put(key, b"x".to_vec(), "text/plain").await?;
            }
            anyhow::Ok(())
        }
    }))
    .await
    .unwrap();
    assert_eq!(storage.list_prefix(&prefix).await.unwrap().len(), 1_050);
    assert_eq!(storage.delete_prefix(&prefix).await.unwrap(), 1_050);
    assert!(storage.list_prefix(&prefix).await.unwrap().is_empty());
    assert_eq!(
        storage.delete_prefix(&prefix).await.unwrap(),
        0,
        "idempotent"
    );
    assert_eq!(storage.get(&neighbour).await.unwrap(), b"kept");
}

#[tokio::test]
#[should_panic(expected = "PostgreSQL unreachable")]
async fn a_missing_postgres_panics_the_test_with_a_clear_message() {
    crate::harness::admin_connection("postgres://postgres@127.0.0.1:1/postgres").await;
}

/// sqlx 0.9.0 leaves Nagle's algorithm on, and a statement longer than one
/// TCP segment then waits 40 ms for the server's delayed ACK; every Slate
/// pool turns it off on each new connection (`slate_events::db::pool_options`).
#[tokio::test]
async fn pooled_connections_to_postgres_send_without_nagle_delay() {
    let db = crate::harness::TestDb::new().await;
    for _ in 0..3 {
        let mut conn = db.conn().await;
        assert_eq!(
            slate_events::db::nodelay(&mut conn).await.unwrap(),
            Some(true),
            "a pooled TCP connection still has Nagle's algorithm on"
        );
    }
}

/// Every Slate pool skips sqlx's liveness check when a connection is taken
/// out soon after it was put back (it was checked then), and keeps it for a
/// connection idle for `PING_AFTER_IDLE` or longer: one that died meanwhile
/// (here terminated by the server) is replaced, not handed out.
#[tokio::test]
async fn a_pooled_connection_that_died_while_idle_is_replaced_before_use() {
    let db = crate::harness::TestDb::with_pool_size(1).await;
    let pid = || async {
        sqlx::query_scalar::<_, i32>("select pg_backend_pid()")
            .fetch_one(&db.pool)
            .await
            .expect("the pool hands out a live connection")
    };
    let first = pid().await;
    // Taken straight back out: the same connection, unchecked.
    assert_eq!(pid().await, first);

    let mut admin = crate::harness::admin_connection(&crate::harness::server_url()).await;
    let terminated: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert!(terminated);
    tokio::time::sleep(slate_events::db::PING_AFTER_IDLE + std::time::Duration::from_millis(300))
        .await;
    let second = pid().await;
    assert_ne!(second, first, "the dead connection was replaced");
}

/// `slate migrate` and `slate demo` create their database when it is
/// missing; several started at once (a deploy's replicas) all go on, the
/// ones that lost the race to create it included.
#[tokio::test]
async fn commands_started_together_create_a_missing_database_once() {
    let name = format!("slate_test_{}", uuid::Uuid::new_v4().simple());
    let server = crate::harness::server_url();
    let url = format!("{}/{name}", server.rsplit_once('/').unwrap().0);
    let results =
        futures::future::join_all((0..8).map(|_| slate::migrate::ensure_database(&url))).await;
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    let mut admin = crate::harness::admin_connection(&server).await;
    let n: i64 = sqlx::query_scalar("select count(*) from pg_database where datname = $1")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(n, 1);
}
