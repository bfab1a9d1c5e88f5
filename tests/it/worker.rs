//! `slate work` as a process: contained panics, graceful shutdown.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use slate_workers::diagnostics::{DiagnosticJob, QUEUE};

use crate::harness::TestDb;

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(db: &TestDb) -> Worker {
    start_worker_with(db, &[])
}

fn start_worker_with(db: &TestDb, env: &[(&str, &str)]) -> Worker {
    let child = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("work")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start slate work");
    Worker(child)
}

async fn job_status(db: &TestDb, kind: &str) -> Option<String> {
    sqlx::query_scalar(
        "select status from apalis.jobs where job_type = $1 and convert_from(job, 'UTF8')::jsonb->>'kind' = $2",
    )
    .bind(QUEUE)
    .bind(kind)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

async fn wait_status(db: &TestDb, kind: &str, want: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = job_status(db, kind).await
            && want.contains(&s.as_str())
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {kind} never reached {want:?} (now {:?})",
            job_status(db, kind).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_panicking_job_does_not_take_the_worker_process_down() {
    let db = TestDb::new().await;
    let mut worker = start_worker(&db);
    let mut conn = db.conn().await;
    slate_workers::jobs::enqueue(&mut conn, QUEUE, &DiagnosticJob::Panic, 1)
        .await
        .unwrap();
    let panicked = wait_status(&db, "panic", &["Killed", "Failed"]).await;
    assert_eq!(panicked, "Killed", "a panic is terminal, not retried");

    // The same process goes on taking jobs.
    slate_workers::jobs::enqueue(&mut conn, QUEUE, &DiagnosticJob::Ping, 1)
        .await
        .unwrap();
    wait_status(&db, "ping", &["Done"]).await;
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker process died"
    );

    // SIGTERM: a graceful stop with exit code 0.
    let pid = worker.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "worker exited with {status}");
}

async fn stripe_status(db: &TestDb) -> (Option<String>, Option<String>) {
    let job: Option<String> =
        sqlx::query_scalar("select status from apalis.jobs where job_type = 'slate.stripe'")
            .fetch_optional(&db.pool)
            .await
            .unwrap();
    let mirror: Option<String> = sqlx::query_scalar("select status from stripe_events")
        .fetch_optional(&db.pool)
        .await
        .unwrap();
    (job, mirror)
}

#[tokio::test]
async fn a_worker_killed_while_processing_a_stripe_event_leaves_it_processed_exactly_once() {
    let db = TestDb::new().await;
    let account = crate::credits::new_account(&mut *db.conn().await).await;
    let raw = crate::stripe::fixture(
        "01_checkout_session_completed_pack",
        account,
        &uuid::Uuid::new_v4().simple().to_string()[..10],
    );
    let event = slate_events::stripe::IncomingEvent::from_raw(&raw, None).unwrap();
    slate_workers::stripe::ingest(
        &db.pool,
        &event,
        slate_events::catalog::StripeSource::Webhook,
    )
    .await
    .unwrap();

    // This worker applies the grant, then hangs before its commit…
    let liveness = [
        ("SLATE_WORKER_HEARTBEAT_SECS", "1"),
        ("SLATE_WORKER_MISSED_HEARTBEATS", "2"),
    ];
    let mut env = liveness.to_vec();
    env.push(("SLATE_FAULT_STRIPE_HOLD_MS", "60000"));
    let mut doomed = start_worker_with(&db, &env);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stripe_status(&db).await.0.as_deref() != Some("Running") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // …and is killed there.
    doomed.0.kill().unwrap();
    doomed.0.wait().unwrap();
    let grants = || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from events where event_type = 'CreditsGranted'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(
        grants().await,
        0,
        "an uncommitted effect survived the crash"
    );

    // Another worker picks the orphaned job up and finishes it.
    let _survivor = start_worker_with(&db, &liveness);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (job, mirror) = stripe_status(&db).await;
        if job.as_deref() == Some("Done") && mirror.as_deref() == Some("processed") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not recovered: job {job:?}, mirror {mirror:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(grants().await, 1);
    let b = slate_events::credits::balance(&mut *db.conn().await, account)
        .await
        .unwrap();
    assert_eq!(b.available, 500);
}
