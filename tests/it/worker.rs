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
    let child = Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("work")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
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
