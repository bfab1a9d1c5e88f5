//! `slate work` as a process: contained panics, graceful shutdown.

use std::process::{Command, Stdio};
use std::time::Duration;

use slate_workers::diagnostics::{DiagnosticJob, QUEUE};

use crate::harness::Process as Worker;
use crate::harness::TestDb;

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

/// Enqueue a diagnostic job (and wake the workers).
async fn enqueue(db: &TestDb, job: &DiagnosticJob) {
    let mut conn = db.conn().await;
    slate_workers::jobs::enqueue(&mut conn, QUEUE, job, 1)
        .await
        .unwrap()
        .send(&db.pool)
        .await;
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
    enqueue(&db, &DiagnosticJob::Panic).await;
    let panicked = wait_status(&db, "panic", &["Killed", "Failed"]).await;
    assert_eq!(panicked, "Killed", "a panic is terminal, not retried");

    // The same process goes on taking jobs.
    enqueue(&db, &DiagnosticJob::Ping).await;
    wait_status(&db, "ping", &["Done"]).await;
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker process died"
    );

    // SIGTERM: a graceful stop with exit code 0.
    terminate(&worker);
    let status = exit_within(&mut worker, Duration::from_secs(40)).await;
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

/// Mirror and queue a pack bought by `account` (Stripe ids made unique by
/// `run`), as a delivery does.
async fn ingest_pack(db: &TestDb, account: uuid::Uuid, run: &str) {
    let raw = crate::stripe::fixture("01_checkout_session_completed_pack", account, run);
    let event = slate_events::stripe::IncomingEvent::from_raw(&raw, None).unwrap();
    slate_workers::stripe::ingest(
        &db.pool,
        &event,
        slate_events::catalog::StripeSource::Webhook,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_worker_killed_while_processing_a_stripe_event_leaves_it_processed_exactly_once() {
    let db = TestDb::new().await;
    let account = crate::credits::new_account(&mut *db.conn().await).await;
    ingest_pack(
        &db,
        account,
        &uuid::Uuid::new_v4().simple().to_string()[..10],
    )
    .await;

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

/// A burst of Stripe deliveries is processed a few at a time
/// (`SLATE_STRIPE_CONCURRENCY`, here 3), not all at once: an unlimited
/// apalis worker runs every job it fetches, and held thousands running on
/// the pool's 20 connections (and hundreds of MiB) behind a burst.
#[tokio::test]
async fn a_burst_of_stripe_events_is_processed_a_few_at_a_time() {
    let db = TestDb::new().await;
    const EVENTS: usize = 30;
    for i in 0..EVENTS {
        // An account each: a pack's grant holds its account's row until
        // its commit, which would make them take turns anyway.
        let account = crate::credits::new_account(&mut *db.conn().await).await;
        let run = format!(
            "burst{i}x{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        ingest_pack(&db, account, &run).await;
    }
    // Each processing holds its transaction open for 1.5 s before its
    // commit: the jobs running at once stay running long enough to count.
    const SLOTS: i64 = 3;
    let slots = SLOTS.to_string();
    let _worker = start_worker_with(
        &db,
        &[
            ("SLATE_FAULT_STRIPE_HOLD_MS", "1500"),
            ("SLATE_STRIPE_CONCURRENCY", &slots),
        ],
    );
    let count = |status: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from apalis.jobs where job_type = 'slate.stripe' and status = $1",
            )
            .bind(status)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut most = 0;
    loop {
        most = most.max(count("Running").await);
        if count("Done").await == EVENTS as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all processed: {} done",
            count("Done").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!((2..=SLOTS).contains(&most), "{most} ran at once");
    let processed: i64 =
        sqlx::query_scalar("select count(*) from stripe_events where status = 'processed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(processed, EVENTS as i64);
}

/// An account with 50 credits, and a video generation of it on the local
/// provider with `parameters`, queued: (account, generation).
async fn submit_local_video(
    db: &TestDb,
    parameters: serde_json::Value,
) -> (uuid::Uuid, uuid::Uuid) {
    submit_local_video_tried(db, parameters, 5).await
}

/// [`submit_local_video`], its job tried at most `attempts` times.
async fn submit_local_video_tried(
    db: &TestDb,
    parameters: serde_json::Value,
    attempts: usize,
) -> (uuid::Uuid, uuid::Uuid) {
    let mut conn = db.conn().await;
    let account = crate::credits::new_account(&mut conn).await;
    crate::credits::grant(
        &mut conn,
        account,
        50,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;
    let generation_id = uuid::Uuid::now_v7();
    let submission = slate_events::generations::Submission {
        generation_id,
        account_id: account,
        kind: "video".into(),
        provider: "local".into(),
        tier: None,
        units: 2,
        collection_id: "default".into(),
        prompt: Some("slow sunrise".into()),
        input_key: None,
        parameters,
        deadline: None,
        webhook_url: None,
        hold_until: chrono::Utc::now() + chrono::Duration::hours(1),
    };
    let mut tx = sqlx::Acquire::begin(&mut *conn).await.unwrap();
    let (_, wake) = slate_workers::generations::submit(
        &mut tx,
        &submission,
        &slate_events::Metadata::system(),
        attempts,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    wake.send(&db.pool).await;
    (account, generation_id)
}

async fn generation_status(db: &TestDb, generation_id: uuid::Uuid) -> String {
    sqlx::query_scalar("select status from generations where generation_id = $1")
        .bind(generation_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// How many events of each of `types` the generation has.
async fn generation_events(
    db: &TestDb,
    generation_id: uuid::Uuid,
    types: &[&str],
) -> Vec<(String, i64)> {
    sqlx::query_as(
        "select event_type, count(*) from events
          where event_type = any($2) and payload->>'generation_id' = $1
          group by event_type order by event_type",
    )
    .bind(generation_id.to_string())
    .bind(types)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn generation_job_status(db: &TestDb, generation_id: uuid::Uuid) -> Option<String> {
    generation_job(db, generation_id)
        .await
        .map(|(status, _, _)| status)
}

/// The generation's job row: status, attempts and the worker it names.
async fn generation_job(
    db: &TestDb,
    generation_id: uuid::Uuid,
) -> Option<(String, i32, Option<String>)> {
    sqlx::query_as(
        "select status, attempts, lock_by from apalis.jobs
          where job_type = $1 and convert_from(job, 'UTF8')::jsonb->>'generation_id' = $2",
    )
    .bind(slate_workers::generations::QUEUE)
    .bind(generation_id.to_string())
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_worker_killed_mid_generation_is_recovered_and_billed_exactly_once() {
    let db = TestDb::new().await;
    let (account, generation_id) =
        submit_local_video(&db, serde_json::json!({"duration": 2, "delay_ms": 2500})).await;
    let status = || generation_status(&db, generation_id);
    let liveness = [
        ("SLATE_WORKER_HEARTBEAT_SECS", "1"),
        ("SLATE_WORKER_MISSED_HEARTBEATS", "2"),
    ];
    let mut doomed = start_worker_with(&db, &liveness);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while status().await != "running" {
        assert!(tokio::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.0.kill().unwrap(); // SIGKILL, mid-provider-call
    doomed.0.wait().unwrap();

    let _survivor = start_worker_with(&db, &liveness);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let s = status().await;
        if s == "succeeded" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not recovered: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        generation_events(&db, generation_id, &["CreditsCaptured", "CreditsReleased"]).await,
        vec![("CreditsCaptured".to_owned(), 1)],
        "one capture, no release"
    );
    let b = slate_events::credits::balance(&mut *db.conn().await, account)
        .await
        .unwrap();
    assert_eq!((b.available, b.reserved), (46, 0));
}

/// The worker counts a generation's attempts against its job's own limit,
/// which the web process wrote when it was submitted, not against its own
/// `SLATE_GENERATION_ATTEMPTS`: a job of one attempt whose provider fails
/// transiently is failed with that reason at once, its credits released.
/// (With the worker's 5, its first attempt asked for a retry that apalis,
/// at the job's limit, never ran: the generation stayed running until the
/// abandoned-job sweep failed it as `job_lost`, ten minutes on.)
#[tokio::test]
async fn the_last_attempt_is_the_jobs_own_not_the_workers() {
    let db = TestDb::new().await;
    let (account, generation_id) = submit_local_video_tried(
        &db,
        serde_json::json!({"duration": 2, "fail": "transient"}),
        1,
    )
    .await;
    let _worker = start_worker_with(&db, &[("SLATE_GENERATION_ATTEMPTS", "5")]);
    until("the generation never failed", async || {
        generation_status(&db, generation_id).await == "failed"
    })
    .await;
    let reason: Option<String> = sqlx::query_scalar(
        "select payload->>'reason_code' from events
          where event_type = 'GenerationFailed' and payload->>'generation_id' = $1",
    )
    .bind(generation_id.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(reason.as_deref(), Some("provider_unavailable"));
    let b = slate_events::credits::balance(&mut *db.conn().await, account)
        .await
        .unwrap();
    assert_eq!((b.available, b.reserved), (50, 0));
}

#[tokio::test]
async fn prompts_never_reach_the_logs_even_at_debug_level() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = crate::credits::new_account(&mut conn).await;
    crate::credits::grant(
        &mut conn,
        account,
        50,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;
    let key = crate::credits::new_key(&mut conn, account).await;
    drop(conn);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path = std::env::temp_dir().join(format!("slate-serve-{}.log", uuid::Uuid::new_v4()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut serve = Worker(
        Command::new(env!("CARGO_BIN_EXE_slate"))
            .arg("serve")
            .env("DATABASE_URL", &db.url)
            .env("SLATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    crate::harness::until_serving(&base, || serve.0.try_wait().unwrap().is_none()).await;
    let secret_words = ["zanzibarquokka", "BEHEAD the velvetmoose"];
    for prompt in [
        format!("a {} at noon", secret_words[0]),
        format!("please {}", secret_words[1]),
    ] {
        let r = client
            .post(format!("{base}/v1/generations"))
            .bearer_auth(&key)
            .json(&serde_json::json!({"kind": "script", "provider": "local", "prompt": prompt}))
            .send()
            .await
            .unwrap();
        assert!([202, 422].contains(&r.status().as_u16()));
    }
    let _ = serve.0.kill();
    let _ = serve.0.wait();
    let logged = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        logged.contains("prompt rejected"),
        "the rejection itself is logged"
    );
    for word in ["zanzibarquokka", "velvetmoose", &key] {
        assert!(!logged.contains(word), "{word} appeared in the logs");
    }
}

#[tokio::test]
async fn the_scheduled_maintenance_job_releases_a_stranded_hold() {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = crate::credits::new_account(&mut conn).await;
    crate::credits::grant(
        &mut conn,
        account,
        10,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;
    let generation = uuid::Uuid::now_v7();
    slate_events::credits::reserve(
        &mut conn,
        account,
        generation,
        4,
        chrono::Utc::now() + chrono::Duration::seconds(1),
        chrono::Utc::now(),
        &slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    drop(conn);
    let _worker = start_worker_with(&db, &[("SLATE_SWEEP_INTERVAL_SECS", "1")]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status: String =
            sqlx::query_scalar("select status from credit_reservations where generation_id = $1")
                .bind(generation)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if status == "released" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hold was never released"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // apalis marks the job done after its handler returns, so a moment
    // after the release itself.
    loop {
        let done: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs where job_type = 'slate.maintenance' and status = 'Done'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if done >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the release did not run as an apalis job"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn pings_done(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "select count(*) from apalis.jobs where job_type = $1 and status = 'Done'
            and convert_from(job, 'UTF8')::jsonb->>'kind' = 'ping'",
    )
    .bind(QUEUE)
    .fetch_one(&db.pool)
    .await
    .unwrap_or(0)
}

/// A database outage longer than the pool's acquire timeout ends every job
/// worker of the process with an error (heartbeats and fetches fail). Found
/// by the chaos soak: the workers stayed ended, the process idled with its
/// projectors spinning, and no job ran again until it was killed. Now each
/// failed worker is restarted and the process goes on taking jobs.
#[tokio::test]
async fn a_worker_takes_jobs_again_after_a_database_outage() {
    let db = TestDb::new().await;
    let mut worker = start_worker_with(
        &db,
        &[
            ("SLATE_WORKER_HEARTBEAT_SECS", "1"),
            ("SLATE_WORKER_MISSED_HEARTBEATS", "2"),
        ],
    );
    let wait_pings = |n: i64| {
        let db = &db;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while pings_done(db).await < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} of {n} pings done",
                    pings_done(db).await
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    enqueue(&db, &DiagnosticJob::Ping).await;
    wait_pings(1).await;

    // The outage, longer than the 5 s acquire timeout.
    outage(&db, Duration::from_secs(8)).await;

    enqueue(&db, &DiagnosticJob::Ping).await;
    wait_pings(2).await;
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker process exited"
    );
}

/// A `slate work` started while PostgreSQL refuses connections waits for
/// it, and takes jobs once it answers. It used to exit after the pool's 5 s
/// acquire timeout (the chaos soak counted dozens of such exits); a
/// supervisor with a growing restart delay could then keep it down long
/// after the database was back. A stop request while it waits ends it
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_the_database_is_down_waits_for_it() {
    let db = TestDb::new().await;
    let (proxy, behind) = crate::outage::Proxy::in_front_of(&db.url).await;
    proxy.cut();

    // Asked to stop while it waits: a clean exit.
    let mut stopped = start_worker_with(&db, &[("DATABASE_URL", &behind)]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(stopped.0.try_wait().unwrap().is_none(), "exited at once");
    terminate(&stopped);
    let status = exit_within(&mut stopped, Duration::from_secs(10)).await;
    assert!(status.success(), "stopped while waiting: {status}");

    // Longer than the acquire timeout, then the database is back.
    let mut worker = start_worker_with(&db, &[("DATABASE_URL", &behind)]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        worker.0.try_wait().unwrap().is_none(),
        "the worker exited while the database was down"
    );
    proxy.restore();
    enqueue(&db, &DiagnosticJob::Ping).await;
    wait_status(&db, "ping", &["Done"]).await;
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker exited");
}

fn terminate(worker: &Worker) {
    let pid = worker.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

async fn exit_within(worker: &mut Worker, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not exit within {limit:?} of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `slate work` process hears of new jobs through one `LISTEN`
/// connection for all its queues, read on a task of its own, and listens
/// again after an outage. Each worker used to hold its own listener from
/// the process's pool (ten of its 20 connections), read only while the
/// worker looked for jobs: a worker with every slot busy left its
/// listener's connection attempt half-way through the handshake, and the
/// PostgreSQL backend at the other end waiting for it (seen holding up an
/// immediate shutdown of the server for up to 60 s in the chaos soak).
#[tokio::test]
async fn a_worker_process_listens_for_every_queue_on_one_connection() {
    let db = TestDb::new().await;
    let mut worker = start_worker(&db);
    until("the worker never registered its eight queues", async || {
        sqlx::query_scalar::<_, i64>("select count(distinct worker_type) from apalis.workers")
            .fetch_one(&db.pool)
            .await
            .unwrap()
            == 8
    })
    .await;
    until("the worker never listened", async || {
        listeners(&db).await >= 1
    })
    .await;
    assert_eq!(listeners(&db).await, 1, "one listener for the seven queues");
    enqueue(&db, &DiagnosticJob::Ping).await;
    wait_status(&db, "ping", &["Done"]).await;

    outage(&db, Duration::from_secs(3)).await;
    until(
        "the worker did not listen again after the outage",
        async || listeners(&db).await == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(listeners(&db).await, 1);
    assert!(worker.0.try_wait().unwrap().is_none(), "the worker exited");
    terminate(&worker);
    assert!(
        exit_within(&mut worker, Duration::from_secs(40))
            .await
            .success()
    );
}

/// Connections of the test's database whose last statement was a LISTEN.
async fn listeners(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity
          where datname = current_database() and query like 'LISTEN %'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// PostgreSQL goes away while a generation waits for its provider. The
/// worker that took it fails (its heartbeat cannot reach the database) and
/// is started again under a new name, while the generation runs on. Found
/// by the long chaos soak: once the database was back, the job's row named
/// a worker that no longer heartbeated, so it was taken for an orphan and
/// run a second time beside the first, which submits to the provider again
/// (and pays again, where the provider has no idempotency key and the first
/// run had not recorded its handle). Now the process keeps the old name
/// alive while its job runs.
#[tokio::test]
async fn a_generation_outlives_its_failed_worker_and_runs_once() {
    let db = TestDb::new().await;
    let (account, generation_id) =
        submit_local_video(&db, serde_json::json!({"duration": 2, "delay_ms": 14000})).await;
    // Silent for 2 s is dead.
    let _worker = start_worker_with(
        &db,
        &[
            ("SLATE_WORKER_HEARTBEAT_SECS", "1"),
            ("SLATE_WORKER_MISSED_HEARTBEATS", "2"),
        ],
    );
    until("the generation never started", async || {
        generation_status(&db, generation_id).await == "running"
    })
    .await;
    let before = generation_workers(&db).await;

    // Longer than the 5 s acquire timeout, and than 2 s of silence.
    outage(&db, Duration::from_secs(7)).await;
    until("no generation worker was started again", async || {
        generation_workers(&db).await.len() > before.len()
    })
    .await;
    // Three beats later; the provider still works on the first run (14 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    still_in_its_first_run(&db, generation_id).await;
    ran_once_and_finished(&db, account, generation_id).await;
}

/// The same outage seen by two `slate work` processes, where the one
/// running the generation comes back 2.5 s after the other. The first one
/// back must not take the other's running job for an orphan: a worker
/// judges others dead only once it has itself been up for as long as they
/// may be silent (here 5 s), which gives the other time to come back and
/// stamp its old name. Without that wait the first heartbeat back (1 s)
/// re-enqueued the job and ran it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_process_back_from_an_outage_leaves_the_others_running_jobs_alone() {
    let db = TestDb::new().await;
    let (account, generation_id) =
        submit_local_video(&db, serde_json::json!({"duration": 2, "delay_ms": 22000})).await;
    // Silent for 5 s is dead.
    let liveness = [
        ("SLATE_WORKER_HEARTBEAT_SECS", "1"),
        ("SLATE_WORKER_MISSED_HEARTBEATS", "5"),
    ];
    let (proxy, behind) = crate::outage::Proxy::in_front_of(&db.url).await;
    let mut through_proxy = liveness.to_vec();
    through_proxy.push(("DATABASE_URL", &behind));
    let _runs_it = start_worker_with(&db, &through_proxy);
    until("the generation never started", async || {
        generation_status(&db, generation_id).await == "running"
    })
    .await;
    // Every one of the first process's generation workers registered (a
    // count read while they still came up made the wait below wait for a
    // total it never reached: twice on the 2026-12-06 machine).
    let one = slate_workers::runtime::GENERATION_FETCHERS;
    until("the first process never registered", async || {
        generation_workers(&db).await.len() == one
    })
    .await;
    let _other = start_worker_with(&db, &liveness);
    until("the other process never registered", async || {
        generation_workers(&db).await.len() == 2 * one
    })
    .await;

    proxy.cut();
    outage(&db, Duration::from_secs(7)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.restore();
    // The other process has been back for 6.5 s, this one for 4 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    still_in_its_first_run(&db, generation_id).await;
    ran_once_and_finished(&db, account, generation_id).await;
}

/// The generation's queue's workers, every process's, live or not.
async fn generation_workers(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("select id from apalis.workers where worker_type = $1 order by id")
        .bind(slate_workers::generations::QUEUE)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

async fn still_in_its_first_run(db: &TestDb, generation_id: uuid::Uuid) {
    assert_eq!(
        generation_status(db, generation_id).await,
        "running",
        "the provider finished sooner than the test needs"
    );
    assert_eq!(
        generation_events(db, generation_id, &["GenerationStarted"]).await,
        vec![("GenerationStarted".to_owned(), 1)],
        "a second run started while the first still runs"
    );
}

/// The generation's job ends, completed by the run that outlived its
/// failed worker (not run again as an orphan once that worker's name was
/// let go), and the generation ran once and was billed once.
async fn ran_once_and_finished(db: &TestDb, account: uuid::Uuid, generation_id: uuid::Uuid) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while generation_job_status(db, generation_id).await.as_deref() != Some("Done") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never finished: {:?}, generation {}",
            generation_job_status(db, generation_id).await,
            generation_status(db, generation_id).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(generation_status(db, generation_id).await, "succeeded");
    let (_, attempts, lock_by) = generation_job(db, generation_id).await.unwrap();
    assert_eq!(
        attempts, 1,
        "the job ran again after its first run finished (lock_by {lock_by:?})"
    );
    assert_eq!(
        generation_events(
            db,
            generation_id,
            &["CreditsCaptured", "CreditsReleased", "GenerationStarted"]
        )
        .await,
        vec![
            ("CreditsCaptured".to_owned(), 1),
            ("GenerationStarted".to_owned(), 1)
        ],
        "one run, one capture, no release"
    );
    let b = slate_events::credits::balance(&mut *db.conn().await, account)
        .await
        .unwrap();
    assert_eq!((b.available, b.reserved), (46, 0));
}

/// `db` refuses connections and loses the ones it had, for `lasting`.
async fn outage(db: &TestDb, lasting: Duration) {
    let name = db.pool.connect_options().get_database().unwrap().to_owned();
    let mut admin = crate::harness::admin_connection(&crate::harness::server_url()).await;
    let set = |allow: bool| format!("alter database {name} allow_connections {allow}");
    sqlx::query(sqlx::AssertSqlSafe(set(false)))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("select pg_terminate_backend(pid) from pg_stat_activity where datname = $1")
        .bind(&name)
        .execute(&mut admin)
        .await
        .unwrap();
    tokio::time::sleep(lasting).await;
    sqlx::query(sqlx::AssertSqlSafe(set(true)))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// The queues' bookkeeping pool commits without waiting for the WAL flush
/// and keeps generic plans; the ordinary pool (every domain write and every
/// enqueue) stays durable, with PostgreSQL's default plan choice.
#[tokio::test]
async fn only_the_queue_bookkeeping_pool_commits_asynchronously_and_keeps_generic_plans() {
    let db = TestDb::new().await;
    let queue_pool = slate_workers::poll::queue_pool(&db.pool);
    for (setting, on_queue, ordinary) in [
        ("synchronous_commit", "off", "on"),
        ("plan_cache_mode", "force_generic_plan", "auto"),
    ] {
        let read = "select current_setting($1)";
        let queue: String = sqlx::query_scalar(read)
            .bind(setting)
            .fetch_one(&queue_pool)
            .await
            .unwrap();
        let plain: String = sqlx::query_scalar(read)
            .bind(setting)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(
            (queue.as_str(), plain.as_str()),
            (on_queue, ordinary),
            "{setting}"
        );
    }
    queue_pool.close().await;
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Held {
    i: usize,
}

/// Lets the held jobs finish once opened; counts the ones that started.
#[derive(Clone)]
struct Gate {
    started: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    open: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            started: Default::default(),
            open: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

async fn held(
    _job: Held,
    gate: apalis::prelude::Data<Gate>,
) -> Result<(), apalis::prelude::BoxDynError> {
    gate.started
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    gate.open.acquire().await?.forget();
    Ok(())
}

async fn worker_last_seen(db: &TestDb, queue: &str) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("select last_seen from apalis.workers where worker_type = $1")
        .bind(queue)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Polls `ready` until it holds; fails with `what` after 60 s. (A bound
/// on a failing run, not a timing: starting a `slate work` process took
/// more than 20 s on a loaded 2-core machine.)
async fn until(what: &str, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !ready().await {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `monitor` on a task of its own until the sender is used (or
/// dropped).
fn spawn_monitor(
    monitor: apalis::prelude::Monitor,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), apalis::prelude::MonitorError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(monitor.run_with_signal(async move {
        let _ = stopped.await;
        Ok(())
    }));
    (stop, running)
}

/// A worker with a concurrency limit claims as many jobs as it has free
/// slots, in one fetch, and no more: the rest stay in the queue for other
/// workers, and it keeps heartbeating while its slots are busy. (apalis-
/// postgres's own storage either claims a fixed batch, whose waiting jobs
/// silence the worker's heartbeat, or, with a batch of one, fetches once
/// per job.)
#[tokio::test]
async fn a_limited_worker_claims_only_its_free_slots_and_keeps_its_heartbeat() {
    use apalis::prelude::*;

    const QUEUE: &str = "test.held";
    let db = TestDb::new().await;
    let tasks = (0..6)
        .map(|i| TaskBuilder::new(serde_json::to_vec(&Held { i }).unwrap()).build())
        .collect();
    let mut conn = db.pool.acquire().await.unwrap();
    apalis_postgres::queries::push_tasks(&mut *conn, QUEUE, tasks)
        .await
        .unwrap();
    drop(conn);

    let queue_pool = slate_workers::poll::queue_pool(&db.pool);
    let wakeups = slate_workers::poll::Wakeups::start(db.pool.clone());
    let config = apalis_postgres::Config::default()
        .queue(QUEUE)
        .batch_size(10)
        // Whole seconds: apalis-postgres's orphan check truncates the
        // missed-beats window (interval × missed) to seconds.
        .heartbeat_interval(Duration::from_secs(1))
        .missed_heartbeats(3);
    let backend = slate_workers::poll::backend::<Held>(&wakeups, &queue_pool, QUEUE, config);
    let gate = Gate::default();
    let (limited, data) = (slate_workers::poll::limited(&backend, 2), gate.clone());
    let monitor = Monitor::new().register(move |_| {
        WorkerBuilder::new("test-held")
            .backend(limited.clone())
            .data(data.clone())
            .concurrency(2)
            .parallelize(tokio::spawn)
            .build(held)
    });
    let (stop, running) = spawn_monitor(monitor);

    until("two jobs never started", async || {
        gate.started.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    // Both slots busy: the worker must keep beating (two beats at least).
    let first = worker_last_seen(&db, QUEUE).await;
    until(
        "no heartbeat while the worker's slots were busy",
        async || worker_last_seen(&db, QUEUE).await >= first + chrono::Duration::milliseconds(1500),
    )
    .await;
    let (claimed, fetches, pending): (i64, i64, i64) = sqlx::query_as(
        "select count(*) filter (where lock_by is not null), \
                count(distinct lock_at) filter (where lock_by is not null), \
                count(*) filter (where status = 'Pending') \
         from apalis.jobs where job_type = $1",
    )
    .bind(QUEUE)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (claimed, fetches, pending),
        (2, 1, 4),
        "two jobs claimed in one fetch, four left in the queue"
    );
    assert_eq!(gate.started.load(std::sync::atomic::Ordering::SeqCst), 2);

    gate.open.add_permits(6);
    until("not all 6 jobs done", async || {
        let done: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs where job_type = $1 and status = 'Done'",
        )
        .bind(QUEUE)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        done == 6
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    queue_pool.close().await;
}

/// A claimed job is decoded from its row as apalis-postgres decodes it
/// (its row type is private, so `slate_workers::queue` decodes it itself):
/// id, queue, payload, status, attempts, limit, priority, lock, idempotency
/// key and metadata.
#[tokio::test]
async fn a_claimed_job_keeps_every_field_of_its_row() {
    use apalis::prelude::Status;

    const ID: &str = "01JDZ8X9Q6V7N2K3M4P5R6S7T8";
    let db = TestDb::new().await;
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name)
         values ('test-claimer', 'test.claim', 'PostgresStorage')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "insert into apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at,
                                  priority, idempotency_key, metadata)
         values ($1, $2, 'test.claim', 'Failed', 2, 5, now() - interval '1 minute', 3,
                 'key-1', 'trace=>abc, origin=>test'::hstore)",
    )
    .bind(b"payload".as_slice())
    .bind(ID)
    .execute(&db.pool)
    .await
    .unwrap();

    let tasks = slate_workers::queue::fetch(&db.pool, "test.claim", "test-claimer", 10)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1);
    let task = &tasks[0];
    assert_eq!(task.args, b"payload");
    assert_eq!(task.task_id().map(|id| id.to_string()).as_deref(), Some(ID));
    assert_eq!(task.queue().map(|q| q.as_ref()), Some("test.claim"));
    assert_eq!(task.status(), Status::Queued);
    assert_eq!(task.attempt(), 2);
    assert_eq!(task.max_attempts(), Some(5));
    assert_eq!(task.priority(), Some(3));
    assert_eq!(task.lock_by(), Some("test-claimer"));
    assert!(task.lock_at().is_some());
    assert_eq!(task.done_at(), None);
    assert_eq!(task.idempotency_key(), Some("key-1"));
    assert_eq!(task.metadata().get("trace"), Some("abc"));
    assert_eq!(task.metadata().get("origin"), Some("test"));

    // Claimed once: a second fetch finds nothing.
    let again = slate_workers::queue::fetch(&db.pool, "test.claim", "test-claimer", 10)
        .await
        .unwrap();
    assert!(again.is_empty());
}

/// An enqueuing transaction notifies no one, so its commit does not queue
/// behind other notifying commits' WAL flushes (migration
/// `…20261204000101`); the enqueuer wakes the workers after the commit, in
/// apalis-postgres's notification format.
#[tokio::test]
async fn enqueuing_notifies_the_workers_only_after_the_commit() {
    let db = TestDb::new().await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen("apalis::job::insert").await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let wake = slate_workers::jobs::enqueue(&mut tx, QUEUE, &DiagnosticJob::Ping, 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let heard = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await;
    assert!(
        heard.is_err(),
        "the enqueuing commit notified: {:?}",
        heard.map(|n| n.map(|n| n.payload().to_owned()))
    );

    wake.send(&db.pool).await;
    let heard = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("the wake-up arrives")
        .unwrap();
    let payload: serde_json::Value = serde_json::from_str(heard.payload()).unwrap();
    let id: String = sqlx::query_scalar("select id from apalis.jobs where job_type = $1")
        .bind(QUEUE)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(payload, serde_json::json!({ "job_type": QUEUE, "id": id }));

    // Nothing enqueued, nothing sent.
    slate_workers::jobs::Wake::none().send(&db.pool).await;
    let heard = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(heard.is_err(), "an empty wake notified");
}

/// A worker's row as apalis-postgres registers it, last beating at
/// `last_seen`.
async fn worker_row(db: &TestDb, id: &str, queue: &str, last_seen: chrono::DateTime<chrono::Utc>) {
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name, layers, last_seen, started_at)
         values ($1, $2, 'PgStorage', '', $3, $3)",
    )
    .bind(id)
    .bind(queue)
    .bind(last_seen)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// The maintenance sweep's hourly retention also deletes the rows of
/// workers that stopped heartbeating a day ago and that no job names any
/// more (a job's `lock_by` references its worker's row). Nothing else did:
/// every process start and every restart of a failed worker adds rows.
#[tokio::test]
async fn the_rows_of_workers_long_dead_go_once_no_job_names_them() {
    let db = TestDb::new().await;
    let day_and_a_bit = chrono::Utc::now() - chrono::Duration::hours(25);
    for (id, last_seen) in [
        ("gone.diagnostics", day_and_a_bit),
        ("gone-but-named.diagnostics", day_and_a_bit),
        ("live.diagnostics", chrono::Utc::now()),
    ] {
        worker_row(&db, id, QUEUE, last_seen).await;
    }
    let mut conn = db.conn().await;
    let _ = slate_workers::jobs::enqueue(&mut conn, QUEUE, &DiagnosticJob::Ping, 1)
        .await
        .unwrap();
    sqlx::query("update apalis.jobs set status = 'Done', lock_by = $1, done_at = now()")
        .bind("gone-but-named.diagnostics")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);

    let report = slate_workers::sweeper::sweep(&db.pool, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(report.workers_forgotten, 1);
    let left: Vec<String> = sqlx::query_scalar("select id from apalis.workers order by id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, ["gone-but-named.diagnostics", "live.diagnostics"]);
}

/// The watchdog's look: a process whose every queue has a fresh worker but
/// one of whose four generation fetchers stopped beating is silent (the
/// chaos soak found one so at its end, which a look by queue let pass); a
/// fresh restart of that fetcher (`.r1`) or its being a failed worker kept
/// alive for its jobs is not.
#[tokio::test]
async fn one_silent_generation_fetcher_is_a_silent_queue() {
    let db = TestDb::new().await;
    let process = "host-4242-0a1b2c3d";
    let now = chrono::Utc::now();
    let stale = now - chrono::Duration::seconds(60);
    let add = async |id: String, queue: &str, last_seen: chrono::DateTime<chrono::Utc>| {
        worker_row(&db, &id, queue, last_seen).await
    };
    for queue in slate_workers::runtime::QUEUES {
        if *queue != slate_workers::generations::QUEUE {
            add(format!("{process}.{queue}"), queue, now).await;
        }
    }
    for i in 0..4 {
        let seen = if i == 1 { stale } else { now };
        add(
            format!("{process}.generations.{i}"),
            slate_workers::generations::QUEUE,
            seen,
        )
        .await;
    }
    // Another process's stale fetcher is not this one's.
    add(
        "host-4243-99999999.generations.0".to_owned(),
        slate_workers::generations::QUEUE,
        stale,
    )
    .await;
    let look = async |retired: &[String]| {
        slate_workers::runtime::silent_queue(&db.pool, process, Duration::from_secs(30), retired)
            .await
            .unwrap()
    };
    assert_eq!(
        look(&[]).await.as_deref(),
        Some(slate_workers::generations::QUEUE)
    );
    assert_eq!(
        look(&[format!("{process}.generations.1")]).await,
        None,
        "a failed worker kept alive for its jobs is not silent"
    );
    add(
        format!("{process}.generations.1.r1"),
        slate_workers::generations::QUEUE,
        now,
    )
    .await;
    assert_eq!(look(&[]).await, None, "its restart beats for it");
}

/// The silent worker of docs/CHAOS.md, made to happen. A queue's fetchers
/// are clones of one backend (as `slate work`'s four generation fetchers
/// are), and every fetch here outlasts the heartbeat interval, so each
/// fetcher's heartbeat timer fires while it fetches: apalis-core polls that
/// timer only between fetches, and the wake-up it gave was spent. With
/// apalis's `Strategy` (shared by the clones: the last poller held its
/// wake-ups) three of the four then stopped beating and fetching, for good,
/// after their first fetch. Every fetcher must keep beating.
#[tokio::test]
async fn fetchers_of_one_queue_keep_beating_when_a_fetch_outlasts_a_beat() {
    use apalis::prelude::*;

    const QUEUE: &str = "test.slow";
    let db = TestDb::new().await;
    // On the queue pool's connections `now()` is this function (first on
    // their search path), which makes a fetch (the only statement that
    // claims jobs `for update skip locked` and sets them `Queued`) take
    // 1.5 s. One job never due makes the fetch's filter call it.
    sqlx::raw_sql(
        "create schema slow;
         create function slow.now() returns timestamptz language plpgsql volatile as $$
         begin
           if current_query() like '%for update skip locked%''Queued''%' then
             perform pg_sleep(1.5);
           end if;
           return pg_catalog.now();
         end $$;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let never = vec![TaskBuilder::new(serde_json::to_vec(&Held { i: 0 }).unwrap()).build()];
    apalis_postgres::queries::push_tasks(&mut *conn, QUEUE, never)
        .await
        .unwrap();
    sqlx::query("update apalis.jobs set run_at = now() + interval '1 day'")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);

    let options = (*db.pool.connect_options())
        .clone()
        .options([("search_path", "slow, pg_catalog, public")]);
    let queue_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_lazy_with(options);
    let wakeups = slate_workers::poll::Wakeups::start(db.pool.clone());
    let config = apalis_postgres::Config::default()
        .queue(QUEUE)
        .heartbeat_interval(Duration::from_secs(1))
        .missed_heartbeats(3);
    let backend = slate_workers::poll::backend::<Held>(&wakeups, &queue_pool, QUEUE, config);
    let gate = Gate::default();
    let monitor = Monitor::new().register_n(4, move |i, _| {
        WorkerBuilder::new(format!("slow.{i}"))
            .backend(slate_workers::poll::limited(&backend, 2))
            .data(gate.clone())
            .concurrency(2)
            .build(held)
    });
    let (stop, running) = spawn_monitor(monitor);

    until("four fetchers never registered", async || {
        let n: i64 =
            sqlx::query_scalar("select count(*) from apalis.workers where worker_type = $1")
                .bind(QUEUE)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        n == 4
    })
    .await;
    // A beat is at most a fetch (1.5 s) and an interval (1 s) late; watch
    // for 12 s (several fetches each).
    let watch = std::time::Instant::now();
    while watch.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stale: Vec<(String, f64)> = sqlx::query_as(
            "select id, extract(epoch from now() - last_seen)::float8 from apalis.workers
              where worker_type = $1 and last_seen < now() - interval '5 seconds' order by id",
        )
        .bind(QUEUE)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert!(
            stale.is_empty(),
            "fetchers silent after {:.1} s (name, seconds since their last beat): {stale:?}",
            watch.elapsed().as_secs_f64()
        );
    }
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    queue_pool.close().await;
}
