//! Queued generations end to end: submission over HTTP against real
//! PostgreSQL, Redis and S3, the job run in place with the local provider.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use slate_workers::generations::GenerationWorker;
use slate_workers::providers::{ProviderSettings, Providers};
use slate_workers::storage::Storage;
use uuid::Uuid;

use crate::billing::key_for;
use crate::http::{TestApp, spawn_app_with};

pub fn storage() -> Storage {
    let config = slate::config::Config::from_env().unwrap();
    Storage::new(&config.storage())
}

pub fn worker(app: &TestApp) -> GenerationWorker {
    GenerationWorker {
        pool: app.db.pool.clone(),
        providers: Arc::new(Providers::new(&ProviderSettings::default()).unwrap()),
        storage: storage(),
        max_attempts: 3,
        poll_interval: Duration::from_millis(20),
        poll_timeout: Duration::from_secs(30),
        downloads: slate_workers::generations::Downloads::new(64 << 20, 256 << 20),
        http: slate_workers::generations::media_client().unwrap(),
        media_allow: vec!["127.0.0.1".into()],
    }
}

impl TestApp {
    pub async fn submit(
        &self,
        key: &str,
        idempotency: Option<&str>,
        body: Value,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self
            .client
            .post(format!("{}/v1/generations", self.address))
            .bearer_auth(key)
            .json(&body);
        if let Some(k) = idempotency {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, r.json().await.unwrap_or(Value::Null), headers)
    }

    /// Run every unfinished generation's attempts in place, as the job
    /// would (without waiting out the backoff).
    pub async fn run_generations(&self) {
        let w = worker(self);
        for _ in 0..10 {
            let open: Vec<(Uuid, i32)> = sqlx::query_as(
                "select generation_id, attempts from generations where status in ('queued', 'running')",
            )
            .fetch_all(&self.db.pool)
            .await
            .unwrap();
            if open.is_empty() {
                return;
            }
            for (id, attempts) in open {
                let _ = slate_workers::generations::attempt(&w, id, attempts + 1).await;
            }
        }
        panic!("generations still unfinished after 10 rounds");
    }

    /// Grant the account `credits` and submit `body` with its key (202);
    /// the accepted generation.
    pub async fn grant_and_submit(
        &self,
        account: Uuid,
        key: &str,
        credits: i64,
        body: Value,
    ) -> Value {
        crate::credits::grant(
            &mut *self.db.conn().await,
            account,
            credits,
            slate_events::catalog::GrantSource::Purchase,
            None,
        )
        .await;
        let (status, g, _) = self.submit(key, None, body).await;
        assert_eq!(status, 202, "{g}");
        g
    }

    async fn balance(&self, key: &str) -> Value {
        self.get_as("/v1/credits", Some(key)).await.1
    }
}

async fn funded(app: &TestApp, credits: i64) -> (Uuid, String) {
    let (account, key) = key_for(app).await;
    if credits > 0 {
        crate::credits::grant(
            &mut *app.db.conn().await,
            account,
            credits,
            slate_events::catalog::GrantSource::Purchase,
            None,
        )
        .await;
    }
    (account, key)
}

fn video(prompt: &str) -> Value {
    json!({"kind": "video", "provider": "local", "prompt": prompt, "parameters": {"duration": 2}, "collection_id": "trailers"})
}

#[tokio::test]
async fn a_video_is_generated_stored_under_the_users_prefix_and_captured() {
    let app = spawn_app_with(&[]).await;
    let (account, key) = funded(&app, 100).await;
    let (status, body, _) = app
        .submit(&key, Some("k1"), video("a lighthouse at dawn"))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["cost"].as_i64()),
        (Some("queued"), Some(4))
    );
    let id = body["id"].as_str().unwrap().to_owned();
    let jobs: i64 =
        sqlx::query_scalar("select count(*) from apalis.jobs where job_type = 'slate.generations'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(jobs, 1, "the job was enqueued with the reservation");
    // The prompt is nowhere in the job payload or the log.
    let leaked: i64 = sqlx::query_scalar(
        "select (select count(*) from apalis.jobs where convert_from(job, 'UTF8') like '%lighthouse%')
              + (select count(*) from events where payload::text like '%lighthouse%')",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(leaked, 0);
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(96), Some(4))
    );

    app.run_generations().await;
    let (status, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(&key))
        .await;
    assert_eq!(status, 200);
    assert_eq!(g["status"], "succeeded", "{g}");
    assert_eq!(g["output"]["content_type"], "image/gif");
    assert_eq!(
        (
            g["output"]["width"].as_i64(),
            g["output"]["height"].as_i64()
        ),
        (Some(64), Some(36))
    );
    assert!(g["output"]["duration_ms"].as_i64().unwrap() > 0);
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(96), Some(0))
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"slate_generations{kind="video",status="succeeded"} 1"#),
        "{metrics}"
    );
    // Every kind and status has its series from the start, 0 where none.
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("slate_generations{"))
        .count();
    assert_eq!(series, 4 * 5, "{metrics}");
    assert!(
        metrics.contains(r#"slate_generations{kind="script",status="canceled"} 0"#),
        "{metrics}"
    );

    // The object is under users/<user>/collections/<collection>/<generation>.<ext>
    // and the presigned URL serves it.
    let object: String =
        sqlx::query_scalar("select output_key from generations where generation_id = $1")
            .bind(Uuid::parse_str(&id).unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        object,
        format!("users/{account}/collections/trailers/{id}.gif")
    );
    let url = g["output"]["url"].as_str().unwrap();
    let fetched = reqwest::get(url).await.unwrap();
    assert_eq!(fetched.status().as_u16(), 200);
    assert!(fetched.bytes().await.unwrap().starts_with(b"GIF89a"));

    // An expired presigned URL does not serve it.
    let short = storage()
        .presign_get(&object, Duration::from_secs(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(reqwest::get(&short).await.unwrap().status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_submissions_on_credits_for_thirty_accept_exactly_thirty() {
    let app = spawn_app_with(&[]).await;
    // A voice-over costs 2 credits.
    let (_, key) = funded(&app, 60).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let client = app.client.clone();
        let url = format!("{}/v1/generations", app.address);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&json!({"kind": "voiceover", "provider": "local", "prompt": format!("line {i}")}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut accepted = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            202 => accepted += 1,
            402 => {
                assert_eq!(body["error"]["code"], "insufficient_credits");
                assert_eq!(body["error"]["details"]["shortfall"], 2);
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!((accepted, refused), (30, 70));
    let jobs: i64 =
        sqlx::query_scalar("select count(*) from apalis.jobs where job_type = 'slate.generations'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(jobs, 30, "a job exists exactly when its reservation does");
    app.run_generations().await;
    let b = app.balance(&key).await;
    let captured: i64 = sqlx::query_scalar("select total_captured from credit_accounts")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(b["available"].as_i64().unwrap() + captured, 60);
    assert_eq!(captured, 60);
}

/// Accounts take turns in the queue (migration `…20261206000501`): a batch
/// one account queued first does not hold back another account's
/// generation, an account that submits again after its turn comes back
/// level with the queue's front, not behind the whole batch, and a retried
/// job (which keeps its early turn) does not let a newcomer's batch
/// overtake an account already waiting.
#[tokio::test]
async fn accounts_take_turns_in_the_queue() {
    let app = spawn_app_with(&[]).await;
    let (alice, alice_key) = funded(&app, 100).await;
    let (bob, bob_key) = funded(&app, 100).await;
    let voiceover =
        |i: usize| json!({"kind": "voiceover", "provider": "local", "prompt": format!("line {i}")});
    for i in 0..4 {
        let (status, g, _) = app.submit(&alice_key, None, voiceover(i)).await;
        assert_eq!(status, 202, "{g}");
    }
    let (status, g, _) = app.submit(&bob_key, None, voiceover(9)).await;
    assert_eq!(status, 202, "{g}");
    register_turns_worker(&app).await;
    let next = |n: usize| fetch_owners(&app, n);
    assert_eq!(next(2).await, [alice, bob], "bob's comes second, not fifth");
    let (status, g, _) = app.submit(&bob_key, None, voiceover(10)).await;
    assert_eq!(status, 202, "{g}");
    assert_eq!(
        next(4).await,
        [alice, bob, alice, alice],
        "bob's second is level with alice's next, not behind her batch"
    );

    // Erin is waiting when alice's first job fails and comes due for its
    // retry, with its turn 0; then carol submits two.
    let (erin, erin_key) = funded(&app, 100).await;
    let (status, g, _) = app.submit(&erin_key, None, voiceover(20)).await;
    assert_eq!(status, 202, "{g}");
    let retried = sqlx::query(
        "update apalis.jobs set status = 'Failed', attempts = 1, run_at = now() - interval '1 second'
          where fair_tag = 0 and convert_from(job, 'UTF8')::jsonb ->> 'generation_id' in
                (select generation_id::text from generations where account_id = $1)",
    )
    .bind(alice)
    .execute(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(retried.rows_affected(), 1);
    let (carol, carol_key) = funded(&app, 100).await;
    for i in [30, 31] {
        let (status, g, _) = app.submit(&carol_key, None, voiceover(i)).await;
        assert_eq!(status, 202, "{g}");
    }
    assert_eq!(
        next(4).await,
        [alice, erin, carol, carol],
        "the retry first, then erin, who was waiting before carol came"
    );
}

/// A queued generation canceled by its owner gives its turn back: its job
/// is withdrawn (done, never fetched), and its account's next submission
/// comes level with the others again, not behind the canceled batch, even
/// while one of the account's generations is still waiting. (Its canceled
/// turns used to count: bob's whole queue went before alice's next one.)
#[tokio::test]
async fn a_canceled_batch_gives_its_turns_back() {
    let app = spawn_app_with(&[]).await;
    let (alice, alice_key) = funded(&app, 100).await;
    let (bob, bob_key) = funded(&app, 100).await;
    let voiceover =
        |i: usize| json!({"kind": "voiceover", "provider": "local", "prompt": format!("line {i}")});
    let mut batch = Vec::new();
    for i in 0..5 {
        let (status, g, _) = app.submit(&alice_key, None, voiceover(i)).await;
        assert_eq!(status, 202, "{g}");
        batch.push(g["id"].as_str().unwrap().to_owned());
    }
    for i in 10..13 {
        let (status, g, _) = app.submit(&bob_key, None, voiceover(i)).await;
        assert_eq!(status, 202, "{g}");
    }
    for id in &batch[1..] {
        let (status, g) = cancel(&app, &alice_key, id).await;
        assert_eq!((status, g["status"].as_str()), (200, Some("canceled")));
    }
    let withdrawn: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs
          where job_type = 'slate.generations' and status = 'Done'
            and convert_from(job, 'UTF8')::jsonb ->> 'generation_id' = any($1)",
    )
    .bind(&batch[1..])
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(withdrawn, 4, "the canceled generations' jobs are done");
    let (status, g, _) = app.submit(&alice_key, None, voiceover(5)).await;
    assert_eq!(status, 202, "{g}");
    register_turns_worker(&app).await;
    assert_eq!(
        fetch_owners(&app, 5).await,
        [alice, bob, bob, alice, bob],
        "alice's new one is level with bob's second round, not behind her canceled four"
    );
}

/// Register the worker `turns` of the generation queue, for
/// [`fetch_owners`].
async fn register_turns_worker(app: &TestApp) {
    sqlx::query(
        "insert into apalis.workers (id, worker_type, storage_name)
         values ('turns', 'slate.generations', 'PostgresStorage')",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
}

/// Fetch the generation queue's next `n` jobs one at a time, as worker
/// `turns`; their generations' accounts, in the order fetched.
async fn fetch_owners(app: &TestApp, n: usize) -> Vec<Uuid> {
    let pool = &app.db.pool;
    let mut owners = Vec::new();
    for _ in 0..n {
        let tasks =
            slate_workers::queue::fetch(pool, slate_workers::generations::QUEUE, "turns", 1)
                .await
                .unwrap();
        let job: slate_workers::generations::GenerationJob =
            serde_json::from_slice(&tasks[0].args).unwrap();
        let owner: Uuid =
            sqlx::query_scalar("select account_id from generations where generation_id = $1")
                .bind(job.generation_id)
                .fetch_one(pool)
                .await
                .unwrap();
        owners.push(owner);
    }
    owners
}

#[tokio::test]
async fn an_idempotency_key_replays_the_first_response_and_refuses_another_body() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let (s1, b1, _) = app.submit(&key, Some("same"), video("waves")).await;
    let (s2, b2, _) = app.submit(&key, Some("same"), video("waves")).await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(b1, b2);
    let count: i64 = sqlx::query_scalar("select count(*) from generations")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    let (s3, b3, _) = app.submit(&key, Some("same"), video("other waves")).await;
    assert_eq!(
        (s3, b3["error"]["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );
    let b = app.balance(&key).await;
    assert_eq!(b["reserved"], 4, "charged once");
}

/// An `Idempotency-Key` answers with its first response for 24 hours, as
/// Stripe's do; afterwards the key is free (a request under it is a new
/// one, whatever its body), and the maintenance sweep deletes it. The rows
/// used to stay until the account was purged.
#[tokio::test]
async fn an_idempotency_key_expires_after_a_day() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let (s1, first, _) = app.submit(&key, Some("daily"), video("waves")).await;
    assert_eq!(s1, 202, "{first}");
    let age = |hours: i32| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query(
                "update idempotency_keys set created_at = now() - make_interval(hours => $1)",
            )
            .bind(hours)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    age(23).await;
    let (s2, again, _) = app.submit(&key, Some("daily"), video("waves")).await;
    assert_eq!(
        (s2, &again),
        (202, &first),
        "within a day: the first answer"
    );

    age(25).await;
    let (s3, other, _) = app.submit(&key, Some("daily"), video("other waves")).await;
    assert_eq!(s3, 202, "{other}");
    assert_ne!(other["id"], first["id"], "a day later: a new generation");
    let (s4, replay, _) = app.submit(&key, Some("daily"), video("other waves")).await;
    assert_eq!(
        (s4, &replay),
        (202, &other),
        "the key now answers for the new one"
    );
    let b = app.balance(&key).await;
    assert_eq!(b["reserved"], 8, "two generations");

    age(25).await;
    let report = slate_workers::sweeper::sweep(&app.db.pool, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(report.idempotency_keys_expired, 1);
    let left: i64 = sqlx::query_scalar("select count(*) from idempotency_keys")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

/// A retry under the same `Idempotency-Key` gets the first answer whatever
/// changed since: here it reaches a process whose deployment no longer
/// offers the provider (a deploy between the two tries), which refuses a
/// new request. A key that is not visible ASCII is refused, not taken for
/// no key (its retry was a second generation, charged again).
#[tokio::test]
async fn a_retry_gets_the_first_answer_whatever_changed_since() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let (status, first, _) = app.submit(&key, Some("deploy"), video("waves")).await;
    assert_eq!(status, 202, "{first}");
    let other = app
        .another_process(&[("SLATE_LOCAL_PROVIDER", "false")])
        .await;
    let post = |base: &str, key_header: Option<reqwest::header::HeaderValue>, body: Value| {
        let mut req = app
            .client
            .post(format!("{base}/v1/generations"))
            .bearer_auth(&key)
            .json(&body);
        if let Some(value) = key_header {
            req = req.header("Idempotency-Key", value);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let deploy = || Some(reqwest::header::HeaderValue::from_static("deploy"));
    assert_eq!(
        post(&other, deploy(), video("waves")).await,
        (202, first.clone()),
        "the retry is answered as the first was"
    );
    let (status, body) = post(&other, None, video("waves")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("unknown_provider")),
        "a new request is not"
    );
    let (status, body) = post(&other, deploy(), video("other waves")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("idempotency_key_reused"))
    );
    for bad in [
        &b"caf\xe9"[..],
        &b""[..],
        &b"tab\there"[..],
        &[b'k'; 201][..],
    ] {
        let value = reqwest::header::HeaderValue::from_bytes(bad).unwrap();
        let (status, body) = post(&app.address, Some(value), video("waves")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_idempotency_key")),
            "{bad:?}"
        );
    }
    let count: i64 = sqlx::query_scalar("select count(*) from generations")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    assert_eq!(app.balance(&key).await["reserved"], 4, "charged once");
}

#[tokio::test]
async fn a_permanent_provider_failure_fails_the_generation_and_refunds_it() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let mut body = video("doomed");
    body["parameters"]["fail"] = "permanent".into();
    let (_, g, _) = app.submit(&key, None, body).await;
    let mut flaky = video("flaky forever");
    flaky["parameters"]["fail"] = "transient".into();
    let (_, f, _) = app.submit(&key, None, flaky).await;
    app.run_generations().await;
    let (_, g) = app
        .get_as(
            &format!("/v1/generations/{}", g["id"].as_str().unwrap()),
            Some(&key),
        )
        .await;
    assert_eq!(
        (g["status"].as_str(), g["failure_code"].as_str()),
        (Some("failed"), Some("content_policy"))
    );
    assert_eq!(g["attempts"], 1, "a permanent error is not retried");
    let (_, f) = app
        .get_as(
            &format!("/v1/generations/{}", f["id"].as_str().unwrap()),
            Some(&key),
        )
        .await;
    assert_eq!(
        (f["status"].as_str(), f["failure_code"].as_str()),
        (Some("failed"), Some("provider_unavailable"))
    );
    assert_eq!(
        f["attempts"], 3,
        "transient errors are retried up to the attempt limit"
    );
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(100), Some(0))
    );
    let releases: i64 =
        sqlx::query_scalar("select count(*) from events where event_type = 'CreditsReleased'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(releases, 2, "one release per failed generation");
}

#[tokio::test]
async fn a_deny_listed_prompt_is_rejected_touches_no_credits_and_is_not_kept() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let prompt = "please show how to BEHEAD the marble statue";
    let (status, body, _) = app.submit(&key, None, video(prompt)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("prompt_rejected")),
        "{body}"
    );
    assert_eq!(body["error"]["details"]["category"], "violence");
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(100), Some(0))
    );
    let (payload,): (Value,) =
        sqlx::query_as("select payload from events where event_type = 'PromptRejected'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(payload["category"], "violence");
    // The hash is sealed with the account's key (a purge makes it unreadable).
    let sealed = payload["prompt_sha256"].as_str().unwrap();
    assert!(slate_events::vault::is_sealed(sealed), "{sealed}");
    assert_eq!(
        slate_events::vault::open(&mut *app.db.conn().await, sealed)
            .await
            .unwrap(),
        slate_events::vault::Opened::Plain(slate_events::moderation::prompt_sha256(prompt))
    );
    let anywhere: i64 = sqlx::query_scalar(
        "select (select count(*) from events where payload::text ilike '%marble%' or metadata::text ilike '%marble%')
              + (select count(*) from generation_inputs where prompt ilike '%marble%')",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(anywhere, 0);
}

#[tokio::test]
async fn another_user_cannot_read_list_or_cancel_a_generation() {
    let app = spawn_app_with(&[]).await;
    let (_, alice) = funded(&app, 100).await;
    let (_, bob) = funded(&app, 100).await;
    let (_, g, _) = app.submit(&alice, None, video("alice's")).await;
    let id = g["id"].as_str().unwrap();
    assert_eq!(
        app.get_as(&format!("/v1/generations/{id}"), Some(&bob))
            .await
            .0,
        404
    );
    assert_eq!(cancel(&app, &bob, id).await.0, 404);
    let (_, list) = app.get_as("/v1/generations", Some(&bob)).await;
    assert!(list["data"].as_array().unwrap().is_empty());
    assert_eq!(
        app.get_as("/v1/generations/not-a-uuid", Some(&alice))
            .await
            .0,
        404
    );
    assert_eq!(
        app.get_as(&format!("/v1/generations/{id}"), None).await.0,
        401
    );

    // The owner cancels it while queued: canceled and released at once.
    let (status, c) = cancel(&app, &alice, id).await;
    assert_eq!((status, c["status"].as_str()), (200, Some("canceled")));
    let b = app.balance(&alice).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(100), Some(0))
    );
    let (status, c) = cancel(&app, &alice, id).await;
    assert_eq!(
        (status, c["error"]["code"].as_str()),
        (409, Some("generation_finished"))
    );
    app.run_generations().await;
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(&alice))
        .await;
    assert_eq!(g["status"], "canceled", "a canceled job does not run");
}

#[tokio::test]
async fn listing_pages_with_a_cursor() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (_, g, _) = app
            .submit(
                &key,
                None,
                json!({"kind": "script", "provider": "local", "prompt": format!("idea {i}")}),
            )
            .await;
        ids.push(g["id"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/generations?limit=2&cursor={c}"),
            None => "/v1/generations?limit=2".to_owned(),
        };
        let (status, page) = app.get_as(&path, Some(&key)).await;
        assert_eq!(status, 200, "{page}");
        for g in page["data"].as_array().unwrap() {
            seen.push(g["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each once");

    // Filtered by status, kind and collection, paging within the filter.
    let (_, v, _) = app.submit(&key, None, video("a reel")).await;
    let (_, c) = app
        .post_json(
            &format!("/v1/generations/{}/cancel", ids[0]),
            Some(&key),
            json!({}),
        )
        .await;
    assert_eq!(c["status"], "canceled", "{c}");
    let listed = async |query: &str| {
        let (status, page) = app
            .get_as(&format!("/v1/generations?{query}"), Some(&key))
            .await;
        assert_eq!(status, 200, "{query}: {page}");
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed("status=canceled").await, [ids[0].clone()]);
    assert_eq!(listed("kind=video").await, [v["id"].as_str().unwrap()]);
    assert_eq!(
        listed("collection_id=trailers").await,
        [v["id"].as_str().unwrap()]
    );
    assert_eq!(listed("kind=script&status=queued").await, ids[1..]);
    assert_eq!(
        listed(&format!(
            "kind=script&status=queued&limit=2&cursor={}",
            ids[2]
        ))
        .await,
        ids[3..]
    );
    assert!(
        listed("status=queued&collection_id=elsewhere")
            .await
            .is_empty()
    );
    assert_eq!(
        listed("status=&kind=video&collection_id=").await,
        [v["id"].as_str().unwrap()],
        "an empty value is no filter"
    );
    assert_eq!(
        listed("kind=video&cursor=").await,
        [v["id"].as_str().unwrap()],
        "an empty cursor is the first page (it was 400 invalid_cursor)"
    );
    assert_eq!(
        listed("kind=video&limit=").await,
        [v["id"].as_str().unwrap()],
        "an empty limit is the default (it was 400 invalid_query)"
    );
    // A filter it does not know, or a value it does not, is refused rather
    // than ignored (which answered everything to `?state=failed`).
    for query in ["state=failed", "status=done", "kind=opera", "limit=x"] {
        let (status, body) = app
            .get_as(&format!("/v1/generations?{query}"), Some(&key))
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{query}"
        );
    }
}

#[tokio::test]
async fn bad_submissions_get_stable_codes_and_unpriced_operations_are_refused() {
    let app = spawn_app_with(&[]).await;
    let (account, key) = funded(&app, 100).await;
    let cases = [
        (
            json!({"kind": "opera", "provider": "local", "prompt": "x"}),
            "invalid_kind",
        ),
        (
            json!({"kind": "video", "provider": "nowhere", "prompt": "x"}),
            "unknown_provider",
        ),
        (
            json!({"kind": "video", "provider": "local"}),
            "prompt_required",
        ),
        (
            json!({"kind": "transcription", "provider": "local"}),
            "input_required",
        ),
        (
            json!({"kind": "video", "provider": "local", "prompt": "x", "parameters": {"duration": 999}}),
            "invalid_parameters",
        ),
        (
            json!({"kind": "video", "provider": "local", "prompt": "x", "collection_id": "../etc"}),
            "invalid_collection",
        ),
        (
            json!({"kind": "transcription", "provider": "local", "input_key": "users/someone-else/a.wav"}),
            "invalid_input",
        ),
        // Longer than an object key can be (1,024 bytes), under the
        // account's own prefix: the storage refused to look it up, which
        // read as its outage (503 storage_unavailable, "retry later").
        (
            json!({"kind": "transcription", "provider": "local",
                   "input_key": format!("{}{}.wav", slate_workers::storage::account_prefix(account), "a".repeat(1100))}),
            "invalid_input",
        ),
        (
            json!({"kind": "video", "provider": "local", "prompt": "x".repeat(5000)}),
            "invalid_prompt",
        ),
        (
            json!({"kind": "video", "provider": "local", "prompt": "x", "extra": 1}),
            "invalid_body",
        ),
        // The fields in order, as an array: serde reads a struct from one,
        // and this was queued as a script.
        (json!(["script", "local", "x"]), "invalid_body"),
    ];
    for (body, code) in cases {
        let (status, resp, _) = app.submit(&key, None, body.clone()).await;
        assert_eq!(
            (status, resp["error"]["code"].as_str()),
            (422, Some(code)),
            "{body}"
        );
    }
    // The database itself refuses an operation without an approved price,
    // and more units than the price allows (Fal.ai makes at most 20 s, for
    // one): a client's mistake either way, not a 500.
    let refused_by_the_database = [
        (
            "delete from approved_operations where operation = 'script:local'",
            json!({"kind": "script", "provider": "local", "prompt": "x"}),
            "operation_not_priced",
        ),
        (
            "update approved_operations set max_units = 20 where operation = 'video:local'",
            json!({"kind": "video", "provider": "local", "prompt": "x", "parameters": {"duration": 30}}),
            "invalid_parameters",
        ),
    ];
    for (change, body, code) in refused_by_the_database {
        sqlx::query(change).execute(&app.db.pool).await.unwrap();
        let (status, resp, _) = app.submit(&key, None, body).await;
        assert_eq!(
            (status, resp["error"]["code"].as_str()),
            (422, Some(code)),
            "{resp}"
        );
    }
    let b = app.balance(&key).await;
    assert_eq!(b["reserved"], 0);
}

#[tokio::test]
async fn submissions_are_rate_limited_per_account_even_when_redis_is_down() {
    for redis in [
        crate::harness::redis_url(),
        "redis://127.0.0.1:1".to_owned(),
    ] {
        let app = spawn_app_with(&[
            ("SLATE_RATE_LIMIT_ACCOUNT_PER_MIN", "3"),
            ("REDIS_URL", &redis),
        ])
        .await;
        let (_, key) = funded(&app, 100).await;
        // The limit counts per fixed minute (by the clock): five requests
        // straddling a minute's end would count in two windows.
        let into_minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            % 60.0;
        if into_minute > 50.0 {
            tokio::time::sleep(Duration::from_secs_f64(60.5 - into_minute)).await;
        }
        let mut statuses = Vec::new();
        let mut retry_after = None;
        for i in 0..5 {
            let (status, _, headers) = app
                .submit(
                    &key,
                    None,
                    json!({"kind": "script", "provider": "local", "prompt": format!("p{i}")}),
                )
                .await;
            statuses.push(status);
            if status == 429 {
                retry_after = headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
            }
        }
        assert_eq!(statuses, vec![202, 202, 202, 429, 429], "redis {redis}");
        let secs: u64 = retry_after.unwrap().parse().unwrap();
        assert!((1..=60).contains(&secs));
    }
}

/// A worker whose Fal.ai provider is the fake at `fal`.
fn fal_worker(app: &TestApp, fal: &wiremock::MockServer) -> GenerationWorker {
    GenerationWorker {
        providers: Arc::new(
            Providers::new(&ProviderSettings {
                fal: Some(slate_workers::providers::EndpointSettings::new(
                    fal.uri(),
                    Some(slate_workers::providers::ApiKey::new("fal_test_key")),
                    Duration::from_secs(5),
                )),
                ..ProviderSettings::default()
            })
            .unwrap(),
        ),
        ..worker(app)
    }
}

/// Fal.ai's answer to a queue submission: request `id` is queued.
fn fal_in_queue(fal: &wiremock::MockServer, id: &str) -> Value {
    let base = format!("{}/fal-ai/kling-video/requests/{id}", fal.uri());
    json!({
        "status": "IN_QUEUE", "request_id": id, "response_url": base,
        "status_url": format!("{base}/status"), "cancel_url": format!("{base}/cancel"),
    })
}

/// Fal.ai accepts one Kling submission into its queue as request `id`.
async fn fal_accepts(fal: &wiremock::MockServer, id: &str) {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};
    Mock::given(method("POST"))
        .and(path(format!("/{KLING}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(fal_in_queue(fal, id)))
        .expect(1)
        .mount(fal)
        .await;
}

/// Fal.ai's side of a finished request `id`: its status (COMPLETED, after
/// any status mocks mounted before), its result and the video it points to.
async fn mount_fal_result(fal: &wiremock::MockServer, id: &str) {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};
    let base = format!("/fal-ai/kling-video/requests/{id}");
    Mock::given(method("GET"))
        .and(path(format!("{base}/status")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"status": "COMPLETED", "request_id": id})),
        )
        .mount(fal)
        .await;
    Mock::given(method("GET"))
        .and(path(base))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "video": {"url": format!("{}/files/out.mp4", fal.uri()), "content_type": "video/mp4"}
        })))
        .mount(fal)
        .await;
    Mock::given(method("GET"))
        .and(path("/files/out.mp4"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_bytes(b"\x00\x00\x00\x18ftypmp42 fake video".to_vec()),
        )
        .mount(fal)
        .await;
}

/// A generation through a real provider adapter (Fal.ai's queue API, faked
/// at the HTTP boundary): a transient failure is retried, the handle is
/// polled, the result downloaded and stored; a content-policy refusal is
/// refunded at once.
#[tokio::test]
async fn a_fal_generation_survives_a_transient_failure_and_a_refusal_is_refunded() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let fal = MockServer::start().await;
    let app = spawn_app_with(&[("FAL_KEY", "fal_test_key"), ("FAL_BASE_URL", &fal.uri())]).await;
    let (account, key) = funded(&app, 200).await;
    let model = "fal-ai/kling-video/v2.1/master/text-to-video";
    // First submission: the queue is overloaded; the retry gets in.
    Mock::given(method("POST"))
        .and(path(format!("/{model}")))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({"detail": "overloaded"})))
        .up_to_n_times(1)
        .mount(&fal)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/{model}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(fal_in_queue(&fal, "req-1")))
        .expect(1)
        .mount(&fal)
        .await;
    mount_fal_result(&fal, "req-1").await;

    let (status, g, _) = app
        .submit(&key, None, json!({"kind": "video", "provider": "fal", "prompt": "a fox in snow", "parameters": {"model": model, "duration": "5"}}))
        .await;
    assert_eq!((status, g["cost"].as_i64()), (202, Some(50)), "{g}");
    let id: Uuid = g["id"].as_str().unwrap().parse().unwrap();

    let w = fal_worker(&app, &fal);
    let first = slate_workers::generations::attempt(&w, id, 1).await;
    assert!(
        matches!(first, slate_workers::generations::AttemptOutcome::RetryAfter(_, ref c) if c == "provider_unavailable"),
        "{first:?}"
    );
    let second = slate_workers::generations::attempt(&w, id, 2).await;
    assert_eq!(second, slate_workers::generations::AttemptOutcome::Finished);
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(&key))
        .await;
    assert_eq!(
        (g["status"].as_str(), g["attempts"].as_i64()),
        (Some("succeeded"), Some(2)),
        "{g}"
    );
    assert_eq!(g["output"]["content_type"], "video/mp4");
    let stored = storage()
        .get(&format!("users/{account}/collections/default/{id}.mp4"))
        .await
        .unwrap();
    assert!(stored.ends_with(b"fake video"));
    // The provider saw the prompt and its parameters, nothing about the
    // user: no account id, no email, not even the generation's id.
    let email: String = sqlx::query_scalar("select email from accounts where account_id = $1")
        .bind(account)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    let seen = fal.received_requests().await.unwrap();
    assert!(!seen.is_empty());
    for r in seen {
        let text = format!(
            "{} {:?} {}",
            r.url,
            r.headers,
            String::from_utf8_lossy(&r.body)
        );
        for identifier in [
            account.to_string(),
            account.simple().to_string(),
            email.clone(),
            id.to_string(),
        ] {
            assert!(
                !text.contains(&identifier),
                "the provider received {identifier}"
            );
        }
    }

    // A refusal by the provider's content policy: failed and refunded at once.
    fal.reset().await;
    Mock::given(method("POST"))
        .and(path(format!("/{model}")))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "detail": [{"loc": ["body", "prompt"], "msg": "The prompt was flagged by our content checker", "type": "content_policy_violation"}]
        })))
        .mount(&fal)
        .await;
    let (_, g, _) = app
        .submit(&key, None, json!({"kind": "video", "provider": "fal", "prompt": "something flagged", "parameters": {"model": model, "duration": "5"}}))
        .await;
    let id2: Uuid = g["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        slate_workers::generations::attempt(&w, id2, 1).await,
        slate_workers::generations::AttemptOutcome::Finished
    );
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id2}"), Some(&key))
        .await;
    assert_eq!(g["status"], "failed", "{g}");
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(150), Some(0))
    );
}

/// A generation holds no database connection while its provider works:
/// three run at once through a worker whose pool has a single connection,
/// each spending 300 ms in the provider's queue call. (Holding the
/// connection across the call, a generation's own status poll would wait
/// for it and the attempt would fail on the pool's timeout, however long.)
#[tokio::test]
async fn generations_waiting_on_their_provider_hold_no_database_connection() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let fal = MockServer::start().await;
    let app = spawn_app_with(&[("FAL_KEY", "fal_test_key"), ("FAL_BASE_URL", &fal.uri())]).await;
    let (_, key) = funded(&app, 500).await;
    let model = "fal-ai/kling-video/v2.1/master/text-to-video";
    Mock::given(method("POST"))
        .and(path(format!("/{model}")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(fal_in_queue(&fal, "req-9"))
                .set_delay(Duration::from_millis(300)),
        )
        .expect(3)
        .mount(&fal)
        .await;
    Mock::given(method("GET"))
        .and(path("/fal-ai/kling-video/requests/req-9/status"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"status": "IN_PROGRESS", "request_id": "req-9"})),
        )
        .up_to_n_times(3)
        .mount(&fal)
        .await;
    mount_fal_result(&fal, "req-9").await;

    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, g, _) = app
            .submit(&key, None, json!({"kind": "video", "provider": "fal", "prompt": format!("a fox in snow {i}"), "parameters": {"model": model, "duration": "5"}}))
            .await;
        assert_eq!(status, 202, "{g}");
        ids.push(g["id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    let mut w = fal_worker(&app, &fal);
    w.pool = slate_events::db::pool_options()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(20))
        .connect(&app.db.url)
        .await
        .unwrap();
    let outcomes = futures::future::join_all(
        ids.iter()
            .map(|id| slate_workers::generations::attempt(&w, *id, 1)),
    )
    .await;
    for (id, outcome) in ids.iter().zip(outcomes) {
        assert_eq!(
            outcome,
            slate_workers::generations::AttemptOutcome::Finished
        );
        let (_, g) = app
            .get_as(&format!("/v1/generations/{id}"), Some(&key))
            .await;
        assert_eq!(g["status"], "succeeded", "{g}");
    }
}

/// A Fal model the operator did not list (`FAL_MODELS`) is refused at
/// submission with 422 `model_not_offered`, and nothing is reserved; a
/// listed one is accepted. (Any model id went through: another account's
/// app on Fal, at its own price, answering with any result address.)
#[tokio::test]
async fn a_fal_model_not_offered_is_refused_at_submission() {
    let fal = wiremock::MockServer::start().await;
    let app = spawn_app_with(&[
        ("FAL_KEY", "fal_test_key"),
        ("FAL_BASE_URL", &fal.uri()),
        ("FAL_MODELS", &format!("fal-ai/minimax/video-01, {KLING}")),
    ])
    .await;
    let (_, key) = funded(&app, 100).await;
    for model in ["someone/pricey-app", "fal-ai/veo3"] {
        let (status, body, _) = app
            .submit(&key, None, json!({"kind": "video", "provider": "fal", "prompt": "a fox in snow", "parameters": {"model": model, "duration": "5"}}))
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("model_not_offered")),
            "{body}"
        );
    }
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(100), Some(0))
    );
    submit_kling_video(&app, &key).await;
    let (status, body, _) = app
        .submit(&key, None, json!({"kind": "video", "provider": "fal", "prompt": "a fox", "parameters": {"duration": "5"}}))
        .await;
    assert_eq!(status, 202, "the first listed is the default: {body}");
    assert!(fal.received_requests().await.unwrap().is_empty());
}

/// The other providers run only the operator's models too
/// (`ELEVENLABS_MODELS`, `SEEDANCE_MODELS`, `ARK_CHAT_MODELS`,
/// `WHISPER_MODELS`): with no list, the built-in default alone; with one,
/// what it names. (Any model went through at the kind's one price: a
/// pricier voice, video or chat model was paid for by the service.)
#[tokio::test]
async fn every_provider_runs_only_the_operators_models() {
    let fake = wiremock::MockServer::start().await;
    let app = spawn_app_with(&[
        ("ELEVENLABS_API_KEY", "xi_test_key"),
        ("ELEVENLABS_BASE_URL", &fake.uri()),
        (
            "ELEVENLABS_MODELS",
            "eleven_flash_v2_5, eleven_multilingual_v2",
        ),
        ("ARK_API_KEY", "ark_test_key"),
        ("ARK_BASE_URL", &fake.uri()),
    ])
    .await;
    let (_, key) = funded(&app, 500).await;
    let refused = [
        json!({"kind": "voiceover", "provider": "elevenlabs", "prompt": "hello", "parameters": {"model_id": "eleven_v3"}}),
        json!({"kind": "voiceover", "provider": "elevenlabs", "prompt": "hello", "parameters": {"model": "eleven_v3"}}),
        json!({"kind": "video", "provider": "seedance", "prompt": "a fox", "parameters": {"model": "seedance-1-0-pro-fast-251015"}}),
        json!({"kind": "script", "provider": "ark", "prompt": "a story", "parameters": {"model": "deepseek-v3-1-250821"}}),
        json!({"kind": "script", "provider": "ark", "prompt": "a story", "parameters": {"model": 7}}),
    ];
    refused_and_nothing_reserved(&app, &key, &refused, "model_not_offered", 500).await;
    let accepted = [
        json!({"kind": "voiceover", "provider": "elevenlabs", "prompt": "hello", "parameters": {"model_id": "eleven_multilingual_v2"}}),
        json!({"kind": "voiceover", "provider": "elevenlabs", "prompt": "hello"}),
        json!({"kind": "video", "provider": "seedance", "prompt": "a fox", "parameters": {"model": slate_workers::providers::seedance::DEFAULT_MODEL}}),
        json!({"kind": "script", "provider": "ark", "prompt": "a story"}),
    ];
    for request in accepted {
        let (status, body, _) = app.submit(&key, None, request.clone()).await;
        assert_eq!(status, 202, "{request}: {body}");
    }
}

/// Submit each of `requests`: each is refused (422 `code`), and the
/// account's `credits` stay available, none reserved.
async fn refused_and_nothing_reserved(
    app: &TestApp,
    key: &str,
    requests: &[Value],
    code: &str,
    credits: i64,
) {
    for request in requests {
        let (status, body, _) = app.submit(key, None, request.clone()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some(code)),
            "{request}: {body}"
        );
    }
    let b = app.balance(key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(credits), Some(0)),
        "nothing was reserved"
    );
}

/// A transcription names its input by the key an earlier generation's
/// output gives (`output.key`; the API gave only a presigned URL, so no
/// key could be had), and one whose key names no stored object is refused
/// at submission, nothing reserved (it was accepted, its credits held, and
/// failed at its attempt).
#[tokio::test]
async fn a_transcription_takes_an_earlier_outputs_key_and_refuses_a_missing_one() {
    let app = spawn_app_with(&[]).await;
    let (account, key) = funded(&app, 100).await;
    let (status, voice, _) = app
        .submit(
            &key,
            None,
            json!({"kind": "voiceover", "provider": "local", "prompt": "hello"}),
        )
        .await;
    assert_eq!(status, 202, "{voice}");
    app.run_generations().await;
    let (_, voice) = app
        .get_as(
            &format!("/v1/generations/{}", voice["id"].as_str().unwrap()),
            Some(&key),
        )
        .await;
    let input = voice["output"]["key"].as_str().unwrap().to_owned();
    assert!(input.starts_with(&format!("users/{account}/")), "{input}");

    let transcription =
        |input: &str| json!({"kind": "transcription", "provider": "local", "input_key": input});
    let (status, t, _) = app.submit(&key, None, transcription(&input)).await;
    assert_eq!(status, 202, "{t}");
    app.run_generations().await;
    let id: Uuid = t["id"].as_str().unwrap().parse().unwrap();
    let (done, available, _) = settled(&app, &key, id).await;
    assert_eq!(done, "succeeded");

    let missing = format!("users/{account}/collections/default/never-stored.mp3");
    refused_and_nothing_reserved(
        &app,
        &key,
        &[transcription(&missing)],
        "input_not_found",
        available,
    )
    .await;
}

/// Seedance's video is priced by its resolution as well as its seconds
/// (`video:seedance:<resolution>`, derived by the migration from the
/// deployment's `video:seedance` price of 10 a second: 3, 5 and 10). With
/// none asked for, it is priced, and made, at 1080p. (Every resolution
/// sold at the one price: BytePlus bills a 1080p video about five times a
/// 480p one.)
#[tokio::test]
async fn a_seedance_video_is_priced_by_its_resolution() {
    let fake = wiremock::MockServer::start().await;
    let app = spawn_app_with(&[
        ("ARK_API_KEY", "ark_test_key"),
        ("ARK_BASE_URL", &fake.uri()),
    ])
    .await;
    let (_, key) = funded(&app, 500).await;
    let video = |parameters: Value| json!({"kind": "video", "provider": "seedance", "prompt": "a fox", "parameters": parameters});
    let refused = [
        video(json!({"resolution": "4k"})),
        video(json!({"resolution": 1080})),
        video(json!({"resolution": ""})),
    ];
    refused_and_nothing_reserved(&app, &key, &refused, "invalid_parameters", 500).await;
    let mut reserved = 0;
    for (parameters, cost, operation) in [
        (json!({"resolution": "480p"}), 15, "video:seedance:480p"),
        (
            json!({"resolution": "720p", "duration": 4}),
            20,
            "video:seedance:720p",
        ),
        (json!({"resolution": "1080P"}), 50, "video:seedance:1080p"),
        (json!({"duration": 2}), 20, "video:seedance:1080p"),
        (Value::Null, 50, "video:seedance:1080p"),
    ] {
        let (status, body, _) = app.submit(&key, None, video(parameters.clone())).await;
        assert_eq!(
            (status, body["cost"].as_i64()),
            (202, Some(cost)),
            "{parameters}: {body}"
        );
        let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
        let recorded: String =
            sqlx::query_scalar("select operation from generations where generation_id = $1")
                .bind(id)
                .fetch_one(&mut *app.db.conn().await)
                .await
                .unwrap();
        assert_eq!(recorded, operation, "{parameters}");
        reserved += cost;
    }
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(500 - reserved), Some(reserved))
    );
}

/// A result is held whole, to be probed and stored, so a process's results
/// in flight share a memory budget (`SLATE_RESULT_MEMORY_MB`): one that
/// does not fit waits until the others are stored, then asks for it again
/// (a response held open meanwhile would time out), and succeeds. (Each of a process's generations could hold up to 512 MiB at once, and
/// the process be killed for it with every generation it was running.)
#[tokio::test]
async fn a_result_waits_for_memory_held_by_others_in_flight() {
    let (fal, app, key) = fal_app().await;
    fal_accepts(&fal, "req-1").await;
    mount_fal_result(&fal, "req-1").await;
    let id = submit_kling_video(&app, &key).await;
    let w = GenerationWorker {
        downloads: slate_workers::generations::Downloads::new(1 << 20, 1 << 20),
        ..fal_worker(&app, &fal)
    };
    // Another result holds the whole budget.
    let held = w.downloads.reserve(1).await.unwrap();
    let attempt = tokio::spawn({
        let w = w.clone();
        async move { slate_workers::generations::attempt(&w, id, 1).await }
    });
    until_fal_called(&fal, "GET", "/files/out.mp4").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!attempt.is_finished(), "it waits for the memory");
    assert_eq!(settled(&app, &key, id).await.0, "running");
    drop(held);
    assert_eq!(
        attempt.await.unwrap(),
        slate_workers::generations::AttemptOutcome::Finished
    );
    assert_eq!(
        settled(&app, &key, id).await,
        ("succeeded".to_owned(), 50, 0)
    );
    assert_eq!(
        fal_calls(&fal, "GET", "/files/out.mp4").await,
        2,
        "asked again once the memory was free, not held open while waiting"
    );
}

/// A result larger than the cap fails the generation (`output_too_large`),
/// its credits released; one whose host announces it larger is not read.
#[tokio::test]
async fn a_result_larger_than_the_cap_fails_and_is_released() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let (fal, app, key) = fal_app().await;
    fal_accepts(&fal, "req-1").await;
    mount_fal_result(&fal, "req-1").await;
    Mock::given(method("GET"))
        .and(path("/files/out.mp4"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![7u8; (1 << 20) + 1]))
        .with_priority(1)
        .mount(&fal)
        .await;
    let id = submit_kling_video(&app, &key).await;
    let w = GenerationWorker {
        downloads: slate_workers::generations::Downloads::new(1 << 20, 8 << 20),
        ..fal_worker(&app, &fal)
    };
    assert_eq!(
        slate_workers::generations::attempt(&w, id, 1).await,
        slate_workers::generations::AttemptOutcome::Finished
    );
    assert_eq!(settled(&app, &key, id).await, ("failed".to_owned(), 100, 0));
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(&key))
        .await;
    assert_eq!(g["failure_code"].as_str(), Some("output_too_large"), "{g}");
}

/// A provider that does not answer a status request (a 503, a 429) is
/// asked again at the next poll, within the same attempt: the generation
/// succeeds on its first attempt. (Each such answer ended the attempt, and
/// five of them, seconds apart, failed the generation while the provider
/// worked on and billed for it.)
#[tokio::test]
async fn a_provider_status_blip_is_polled_through_within_the_attempt() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let (fal, app, key) = fal_app().await;
    fal_accepts(&fal, "req-1").await;
    let status = "/fal-ai/kling-video/requests/req-1/status";
    for answer in [
        ResponseTemplate::new(503).set_body_json(json!({"detail": "overloaded"})),
        ResponseTemplate::new(429).set_body_json(json!({"detail": "rate limited"})),
    ] {
        Mock::given(method("GET"))
            .and(path(status))
            .respond_with(answer)
            .up_to_n_times(3)
            .with_priority(1)
            .mount(&fal)
            .await;
    }
    mount_fal_result(&fal, "req-1").await;
    let id = submit_kling_video(&app, &key).await;
    let w = fal_worker(&app, &fal);
    let outcome = slate_workers::generations::attempt(&w, id, 1).await;
    assert_eq!(
        outcome,
        slate_workers::generations::AttemptOutcome::Finished
    );
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(&key))
        .await;
    assert_eq!(
        (g["status"].as_str(), g["attempts"].as_i64()),
        (Some("succeeded"), Some(1)),
        "{g}"
    );
    assert_eq!(fal_calls(&fal, "GET", "/status").await, 7);
}

/// A generation whose last attempt gives up on a provider job still
/// running (here: it never finished within the polling time) fails, its
/// credits released, and the provider is asked to stop that job: nobody
/// will fetch its result, and it would go on being billed. (It was left
/// running.) A stop job is queued with the failure, and a provider that
/// cannot be reached is asked again by its next attempt. (It was asked
/// once, after the commit: a provider's error, or a crash in between, left
/// its job running.)
#[tokio::test]
async fn a_generation_failed_for_good_asks_the_provider_to_stop_its_job() {
    use slate_workers::generations::{AttemptOutcome, STOP_ATTEMPTS, attempt_of, stop_job_key};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let (fal, app, key) = fal_app().await;
    fal_job_never_finishes(&fal, "req-5").await;
    Mock::given(method("PUT"))
        .and(path("/fal-ai/kling-video/requests/req-5/cancel"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&fal)
        .await;
    let id = submit_kling_video(&app, &key).await;
    let w = GenerationWorker {
        max_attempts: 1,
        poll_timeout: Duration::from_millis(300),
        ..fal_worker(&app, &fal)
    };
    let outcome = slate_workers::generations::attempt(&w, id, 1).await;
    assert_eq!(outcome, AttemptOutcome::Finished);
    assert_eq!(settled(&app, &key, id).await, ("failed".to_owned(), 100, 0));
    assert_eq!(
        fal_calls(&fal, "PUT", "/cancel").await,
        0,
        "not asked inline"
    );
    let stop: (i32, String) = sqlx::query_as(
        "select max_attempts, status from apalis.jobs
          where job_type = 'slate.generations' and idempotency_key = $1",
    )
    .bind(stop_job_key(id))
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(stop, (STOP_ATTEMPTS as i32, "Pending".to_owned()));

    // The stop job: Fal.ai answers 503, then accepts.
    let first = attempt_of(&w, id, 1, STOP_ATTEMPTS).await;
    assert!(
        matches!(first, AttemptOutcome::RetryAfter(_, ref c) if c == "provider_unavailable"),
        "{first:?}"
    );
    assert_eq!(
        attempt_of(&w, id, 2, STOP_ATTEMPTS).await,
        AttemptOutcome::Finished
    );
    assert_eq!(fal_calls(&fal, "PUT", "/cancel").await, 2);
    assert_eq!(settled(&app, &key, id).await, ("failed".to_owned(), 100, 0));
    fal.verify().await;
}

/// A generation whose deadline passes between two attempts (the first gave
/// up polling a provider job still running) is canceled unbilled by the
/// next, and the provider is asked to stop that job. (It was left running,
/// and billed.)
#[tokio::test]
async fn a_deadline_passed_between_attempts_asks_the_provider_to_stop_its_job() {
    // The next attempt finds the deadline passed, or finds the generation
    // canceled by the sweep (which has no provider to tell) meanwhile.
    for swept_first in [false, true] {
        let (fal, app, key) = fal_app().await;
        fal_job_never_finishes(&fal, "req-5").await;
        let id = submit_kling_video(&app, &key).await;
        let w = first_attempt_gives_up_polling(&app, &fal, id).await;
        sqlx::query("update generations set deadline = now() where generation_id = $1")
            .bind(id)
            .execute(&app.db.pool)
            .await
            .unwrap();
        if swept_first {
            let swept = slate_workers::sweeper::sweep(&app.db.pool, chrono::Utc::now())
                .await
                .unwrap();
            assert_eq!(swept.generations_past_deadline, 1);
            let stop: i64 =
                sqlx::query_scalar("select count(*) from apalis.jobs where idempotency_key = $1")
                    .bind(slate_workers::generations::stop_job_key(id))
                    .fetch_one(&app.db.pool)
                    .await
                    .unwrap();
            assert_eq!(stop, 0, "its own job, still live, stops the provider's");
        }
        second_attempt_ends_it_canceled(&app, &w, &key, id).await;
        if !swept_first {
            // Canceled by its own job, which queued the stop job with the
            // cancellation.
            assert_eq!(fal_calls(&fal, "PUT", "/cancel").await, 0);
            let stop: i64 = sqlx::query_scalar(
                "select count(*) from apalis.jobs where idempotency_key = $1 and status = 'Pending'",
            )
            .bind(slate_workers::generations::stop_job_key(id))
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
            assert_eq!(stop, 1);
            assert_eq!(
                slate_workers::generations::attempt(&w, id, 1).await,
                slate_workers::generations::AttemptOutcome::Finished
            );
        }
        fal.verify().await;
    }
}

/// The sweep ends a generation whose provider had accepted the work and
/// whose job then died (killed): failed `job_lost` ten minutes on, or, when
/// its deadline passes first, canceled `deadline_passed`. Either way its
/// provider job is stopped: the sweep has no providers, so it queues a job
/// that finds the generation ended and asks the provider. (It was left
/// running, and billed: a lost job's until the twenty-eighth session, an
/// overdue one's until the twenty-ninth, whose deadline path relied on the
/// generation's own job, gone here.)
#[tokio::test]
async fn a_provider_job_is_stopped_when_the_sweep_ends_its_generation() {
    for overdue in [false, true] {
        let (fal, app, key) = fal_app().await;
        fal_job_never_finishes(&fal, "req-5").await;
        let mut body = json!({"kind": "video", "provider": "fal", "prompt": "a fox in snow", "parameters": {"model": KLING, "duration": "5"}});
        if overdue {
            body["deadline_seconds"] = 60.into();
        }
        let (status, g, _) = app.submit(&key, None, body).await;
        assert_eq!(status, 202, "{g}");
        let id: Uuid = g["id"].as_str().unwrap().parse().unwrap();
        let w = first_attempt_gives_up_polling(&app, &fal, id).await;
        sqlx::query(
            "update apalis.jobs set status = 'Killed'
              where convert_from(job, 'UTF8')::jsonb ->> 'generation_id' = $1::text",
        )
        .bind(id)
        .execute(&app.db.pool)
        .await
        .unwrap();
        let (later, swept, ended) = if overdue {
            (chrono::TimeDelta::minutes(2), (1, 0), "canceled")
        } else {
            (
                slate_workers::generations::ABANDONED_AFTER * 2,
                (0, 1),
                "failed",
            )
        };
        let report = slate_workers::sweeper::sweep(&app.db.pool, chrono::Utc::now() + later)
            .await
            .unwrap();
        assert_eq!(
            (
                report.generations_past_deadline,
                report.generations_abandoned
            ),
            swept,
            "overdue: {overdue}"
        );
        assert_eq!(settled(&app, &key, id).await, (ended.to_owned(), 100, 0));
        let stop: i64 = sqlx::query_scalar(
            "select count(*) from apalis.jobs
              where job_type = 'slate.generations' and status = 'Pending' and idempotency_key = $1",
        )
        .bind(slate_workers::generations::stop_job_key(id))
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(stop, 1, "a job to stop the provider's (overdue: {overdue})");
        assert_eq!(
            slate_workers::generations::attempt(&w, id, 1).await,
            slate_workers::generations::AttemptOutcome::Finished
        );
        fal.verify().await;
        assert_eq!(settled(&app, &key, id).await, (ended.to_owned(), 100, 0));
    }
}

/// A generation whose cancellation its owner asked for, and whose provider
/// job was canceled but not yet recorded as such (the attempt that asked
/// could not record it), ends canceled when the next attempt hears
/// "cancelled" from the provider, not failed with `cancelled`.
#[tokio::test]
async fn a_cancellation_heard_from_the_provider_ends_the_generation_canceled() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let (fal, app, key) = fal_app().await;
    fal_accepts(&fal, "req-6").await;
    let status = "/fal-ai/kling-video/requests/req-6/status";
    let answer = |s: &str| {
        ResponseTemplate::new(200).set_body_json(json!({"status": s, "request_id": "req-6"}))
    };
    Mock::given(method("GET"))
        .and(path(status))
        .respond_with(answer("IN_PROGRESS"))
        .mount(&fal)
        .await;
    let id = submit_kling_video(&app, &key).await;
    let w = first_attempt_gives_up_polling(&app, &fal, id).await;
    let (code, c) = cancel(&app, &key, id).await;
    assert_eq!((code, c["cancel_requested"].as_bool()), (202, Some(true)));
    Mock::given(method("GET"))
        .and(path(status))
        .respond_with(answer("CANCELLED"))
        .with_priority(1)
        .mount(&fal)
        .await;
    second_attempt_ends_it_canceled(&app, &w, &key, id).await;
}

/// A worker that gives up polling after 300 ms, and its first attempt of
/// generation `id`, which does so (its job to be retried).
async fn first_attempt_gives_up_polling(
    app: &TestApp,
    fal: &wiremock::MockServer,
    id: Uuid,
) -> GenerationWorker {
    let w = GenerationWorker {
        poll_timeout: Duration::from_millis(300),
        ..fal_worker(app, fal)
    };
    let outcome = slate_workers::generations::attempt(&w, id, 1).await;
    assert!(
        matches!(
            outcome,
            slate_workers::generations::AttemptOutcome::RetryAfter(..)
        ),
        "{outcome:?}"
    );
    w
}

/// Generation `id`'s second attempt finishes it canceled, its 100 credits
/// released.
async fn second_attempt_ends_it_canceled(app: &TestApp, w: &GenerationWorker, key: &str, id: Uuid) {
    assert_eq!(
        slate_workers::generations::attempt(w, id, 2).await,
        slate_workers::generations::AttemptOutcome::Finished
    );
    assert_eq!(settled(app, key, id).await, ("canceled".to_owned(), 100, 0));
}

/// Fal.ai's side of request `id`, accepted and in progress for good; its
/// cancellation is expected once.
async fn fal_job_never_finishes(fal: &wiremock::MockServer, id: &str) {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};
    fal_accepts(fal, id).await;
    let base = format!("/fal-ai/kling-video/requests/{id}");
    Mock::given(method("GET"))
        .and(path(format!("{base}/status")))
        .respond_with(
            ResponseTemplate::new(202)
                .set_body_json(json!({"status": "IN_PROGRESS", "request_id": id})),
        )
        .mount(fal)
        .await;
    Mock::given(method("PUT"))
        .and(path(format!("{base}/cancel")))
        .respond_with(
            ResponseTemplate::new(202).set_body_json(json!({"status": "CANCELLATION_REQUESTED"})),
        )
        .expect(1)
        .mount(fal)
        .await;
}

/// A result host that answers 429 (or 408) is asked again by the next
/// attempt, which finds the provider's job done and fetches the result: the
/// generation succeeds. (Any 4xx failed it for good, throwing away a result
/// already paid for.)
#[tokio::test]
async fn a_rate_limited_result_download_is_tried_again() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let (fal, app, key) = fal_app().await;
    fal_accepts(&fal, "req-1").await;
    Mock::given(method("GET"))
        .and(path("/files/out.mp4"))
        .respond_with(ResponseTemplate::new(429))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&fal)
        .await;
    mount_fal_result(&fal, "req-1").await;
    let id = submit_kling_video(&app, &key).await;
    let w = fal_worker(&app, &fal);
    let first = slate_workers::generations::attempt(&w, id, 1).await;
    assert!(
        matches!(first, slate_workers::generations::AttemptOutcome::RetryAfter(_, ref c) if c == "provider_unavailable"),
        "{first:?}"
    );
    let second = slate_workers::generations::attempt(&w, id, 2).await;
    assert_eq!(second, slate_workers::generations::AttemptOutcome::Finished);
    assert_eq!(
        settled(&app, &key, id).await,
        ("succeeded".to_owned(), 50, 0)
    );
}

/// A provider's result address is checked before the worker fetches it,
/// and so is each redirect it takes: plain http to a host not on the
/// allow-list, https to a private address, or a redirect from an allowed
/// host to a name resolving to loopback, fail the generation with
/// `output_refused` and release its credits, and the internal address is
/// never asked. (Fetched as given, a model's answer could have the worker
/// read an internal service and store the answer for the user.)
#[tokio::test]
async fn a_result_pointing_at_an_internal_address_is_refused_and_released() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let (fal, app, key) = fal_app().await;
    let port = fal.address().port();
    Mock::given(method("GET"))
        .and(path("/files/hop.mp4"))
        .respond_with(ResponseTemplate::new(302).insert_header(
            "location",
            format!("http://localhost:{port}/files/secret").as_str(),
        ))
        .mount(&fal)
        .await;
    Mock::given(method("GET"))
        .and(path("/files/secret"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(b"internal".to_vec()))
        .mount(&fal)
        .await;
    let w = fal_worker(&app, &fal);
    Mock::given(method("GET"))
        .and(path("/files/hop-https.mp4"))
        .respond_with(ResponseTemplate::new(302).insert_header(
            "location",
            format!("https://localhost:{port}/files/secret").as_str(),
        ))
        .mount(&fal)
        .await;
    for (n, url) in [
        format!("http://localhost:{port}/files/secret"),
        "https://10.0.0.1/files/out.mp4".to_owned(),
        // https, but the name resolves to loopback.
        format!("https://localhost:{port}/files/secret"),
        format!("{}/files/hop.mp4", fal.uri()),
        format!("{}/files/hop-https.mp4", fal.uri()),
    ]
    .into_iter()
    .enumerate()
    {
        let request = format!("req-{n}");
        let base = format!("/fal-ai/kling-video/requests/{request}");
        Mock::given(method("POST"))
            .and(path(format!("/{KLING}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(fal_in_queue(&fal, &request)))
            .up_to_n_times(1)
            .mount(&fal)
            .await;
        Mock::given(method("GET"))
            .and(path(format!("{base}/status")))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"status": "COMPLETED", "request_id": request})),
            )
            .mount(&fal)
            .await;
        Mock::given(method("GET"))
            .and(path(base))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "video": {"url": url, "content_type": "video/mp4"}
            })))
            .mount(&fal)
            .await;
        let id = submit_kling_video(&app, &key).await;
        let outcome = slate_workers::generations::attempt(&w, id, 1).await;
        assert_eq!(
            outcome,
            slate_workers::generations::AttemptOutcome::Finished,
            "{url}"
        );
        let (_, g) = app
            .get_as(&format!("/v1/generations/{id}"), Some(&key))
            .await;
        assert_eq!(
            (g["status"].as_str(), g["failure_code"].as_str()),
            (Some("failed"), Some("output_refused")),
            "{url}: {g}"
        );
        assert_eq!(
            settled(&app, &key, id).await,
            ("failed".to_owned(), 100, 0),
            "{url}"
        );
    }
    assert_eq!(fal_calls(&fal, "GET", "/files/hop.mp4").await, 1);
    assert_eq!(fal_calls(&fal, "GET", "/files/hop-https.mp4").await, 1);
    assert_eq!(fal_calls(&fal, "GET", "/secret").await, 0, "never asked");
}

/// A fake Fal.ai, an app that uses it, and the key of an account holding
/// 100 credits.
async fn fal_app() -> (wiremock::MockServer, TestApp, String) {
    let fal = wiremock::MockServer::start().await;
    let app = spawn_app_with(&[("FAL_KEY", "fal_test_key"), ("FAL_BASE_URL", &fal.uri())]).await;
    let (_, key) = funded(&app, 100).await;
    (fal, app, key)
}

/// `POST /v1/generations/{id}/cancel` with `key`: its status and body.
async fn cancel(app: &TestApp, key: &str, id: impl std::fmt::Display) -> (u16, Value) {
    app.post_json(
        &format!("/v1/generations/{id}/cancel"),
        Some(key),
        json!({}),
    )
    .await
}

/// Generation `id`'s status, and its account's available and reserved
/// credits.
async fn settled(app: &TestApp, key: &str, id: Uuid) -> (String, i64, i64) {
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(key))
        .await;
    let b = app.balance(key).await;
    (
        g["status"].as_str().unwrap_or_default().to_owned(),
        b["available"].as_i64().unwrap_or(-1),
        b["reserved"].as_i64().unwrap_or(-1),
    )
}

/// Fal.ai's Kling text-to-video model, as the tests submit it.
const KLING: &str = "fal-ai/kling-video/v2.1/master/text-to-video";

/// Submit a 5 s Kling video (50 credits); its generation's id.
async fn submit_kling_video(app: &TestApp, key: &str) -> Uuid {
    let (status, g, _) = app
        .submit(key, None, json!({"kind": "video", "provider": "fal", "prompt": "a fox in snow", "parameters": {"model": KLING, "duration": "5"}}))
        .await;
    assert_eq!(status, 202, "{g}");
    g["id"].as_str().unwrap().parse().unwrap()
}

/// A Fal.ai worker whose database is reached through a proxy the test can
/// cut, with a 1 s acquire timeout.
async fn fal_worker_behind_proxy(
    app: &TestApp,
    fal: &wiremock::MockServer,
) -> (Arc<crate::outage::Proxy>, GenerationWorker) {
    let (proxy, url) = crate::outage::Proxy::in_front_of(&app.db.url).await;
    let mut w = fal_worker(app, fal);
    w.pool = slate_events::db::pool_options()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .unwrap();
    (proxy, w)
}

/// How many requests the fake received with `method` to a path ending in
/// `suffix`.
async fn fal_calls(fal: &wiremock::MockServer, method: &str, suffix: &str) -> usize {
    fal.received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.method.as_str() == method && r.url.path().ends_with(suffix))
        .count()
}

/// Wait (at most 20 s) until the fake has received such a request.
async fn until_fal_called(fal: &wiremock::MockServer, method: &str, suffix: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fal_calls(fal, method, suffix).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {method} …{suffix}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run attempt 1 of generation `id` on a task of its own.
fn spawn_attempt(
    w: &GenerationWorker,
    id: Uuid,
) -> tokio::task::JoinHandle<slate_workers::generations::AttemptOutcome> {
    let w = w.clone();
    tokio::spawn(async move { slate_workers::generations::attempt(&w, id, 1).await })
}

/// The attempt ended within 30 s, finished (not to be retried).
async fn attempt_finished(
    running: tokio::task::JoinHandle<slate_workers::generations::AttemptOutcome>,
) {
    let outcome = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the attempt ends once the database is back")
        .unwrap();
    assert_eq!(
        outcome,
        slate_workers::generations::AttemptOutcome::Finished
    );
}

/// The attempt ended within 30 s, finished; the generation succeeded in
/// that one attempt, with one submission to the provider.
async fn finished_in_one_attempt(
    app: &TestApp,
    fal: &wiremock::MockServer,
    key: &str,
    id: Uuid,
    running: tokio::task::JoinHandle<slate_workers::generations::AttemptOutcome>,
) {
    attempt_finished(running).await;
    assert_eq!(
        fal_calls(fal, "POST", "text-to-video").await,
        1,
        "the provider was submitted to again"
    );
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(key))
        .await;
    assert_eq!(
        (g["status"].as_str(), g["attempts"].as_i64()),
        (Some("succeeded"), Some(1)),
        "{g}"
    );
}

/// Submit a Kling video and start its attempt on a worker behind a proxy;
/// Fal.ai answers the submission with `answer` 0.5 s into a PostgreSQL
/// outage of 2.5 s, which outlasts two acquire timeouts. The generation's
/// id and its running attempt, once the database is back.
async fn submission_answered_in_an_outage(
    app: &TestApp,
    fal: &wiremock::MockServer,
    key: &str,
    answer: wiremock::ResponseTemplate,
) -> (
    Uuid,
    tokio::task::JoinHandle<slate_workers::generations::AttemptOutcome>,
) {
    use wiremock::Mock;
    use wiremock::matchers::{method, path};

    Mock::given(method("POST"))
        .and(path(format!("/{KLING}")))
        .respond_with(answer.set_delay(Duration::from_millis(500)))
        .mount(fal)
        .await;
    let id = submit_kling_video(app, key).await;
    let (proxy, w) = fal_worker_behind_proxy(app, fal).await;
    let running = spawn_attempt(&w, id);
    until_fal_called(fal, "POST", "text-to-video").await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    proxy.restore();
    (id, running)
}

/// Fal.ai takes no idempotency key: the recorded handle is what keeps a
/// second attempt from submitting (and paying) again. PostgreSQL goes out of
/// reach just as the handle comes back (the connections reset, new ones
/// refused, for longer than the worker pool's acquire timeout): the attempt
/// waits for the database, records the handle and finishes, with one
/// submission. (Dropping the handle, it ended in a retry that submitted
/// again.)
#[tokio::test]
async fn a_provider_handle_is_recorded_through_a_short_database_outage() {
    use wiremock::ResponseTemplate;

    let (fal, app, key) = fal_app().await;
    let answer = ResponseTemplate::new(200).set_body_json(fal_in_queue(&fal, "req-7"));
    mount_fal_result(&fal, "req-7").await;
    let (id, running) = submission_answered_in_an_outage(&app, &fal, &key, answer).await;

    finished_in_one_attempt(&app, &fal, &key, id, running).await;
    let handle: Option<String> = sqlx::query_scalar(
        "select payload->>'provider_handle' from events
          where stream_id = $1 and event_type = 'GenerationSubmitted'",
    )
    .bind(format!("generation-{id}"))
    .fetch_optional(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(handle.as_deref(), Some("fal-ai/kling-video/requests/req-7"));
}

/// The provider refuses the submission for good just as PostgreSQL goes
/// out of reach: the failure, the attempt's last word, waits for the
/// database and is recorded, and the credits come back. (Recorded once,
/// without waiting, it was lost: the job ended Done and the generation
/// stayed running, with nothing left to finish it.)
#[tokio::test]
async fn a_terminal_failure_is_recorded_through_a_short_database_outage() {
    use wiremock::ResponseTemplate;

    let (fal, app, key) = fal_app().await;
    let refusal = ResponseTemplate::new(422).set_body_json(json!({"detail": [{"loc": ["body", "duration"], "msg": "unexpected value", "type": "value_error"}]}));
    let (id, running) = submission_answered_in_an_outage(&app, &fal, &key, refusal).await;

    attempt_finished(running).await;
    assert_eq!(settled(&app, &key, id).await, ("failed".into(), 100, 0));
}

/// PostgreSQL goes out of reach while the provider works and is still out
/// when the provider finishes: the cancellation checks between polls are
/// skipped rather than ending the attempt (which would spend one of the
/// generation's retries), and the outcome, once the output is stored,
/// waits for the database. One attempt, one submission, captured once.
#[tokio::test]
async fn a_database_outage_while_the_provider_works_costs_no_attempt() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, Request, Respond, ResponseTemplate};

    /// IN_PROGRESS until the flag is set, then COMPLETED.
    struct Status(Arc<AtomicBool>);
    impl Respond for Status {
        fn respond(&self, _: &Request) -> ResponseTemplate {
            let status = if self.0.load(Ordering::SeqCst) {
                "COMPLETED"
            } else {
                "IN_PROGRESS"
            };
            ResponseTemplate::new(200)
                .set_body_json(json!({"status": status, "request_id": "req-8"}))
        }
    }

    let (fal, app, key) = fal_app().await;
    Mock::given(method("POST"))
        .and(path(format!("/{KLING}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(fal_in_queue(&fal, "req-8")))
        .mount(&fal)
        .await;
    let done = Arc::new(AtomicBool::new(false));
    Mock::given(method("GET"))
        .and(path("/fal-ai/kling-video/requests/req-8/status"))
        .respond_with(Status(done.clone()))
        .mount(&fal)
        .await;
    mount_fal_result(&fal, "req-8").await;
    let id = submit_kling_video(&app, &key).await;
    let (proxy, w) = fal_worker_behind_proxy(&app, &fal).await;
    let running = spawn_attempt(&w, id);
    until_fal_called(&fal, "GET", "/status").await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let polled = fal_calls(&fal, "GET", "/status").await;
    // Finished, with the outage to last more than two acquire timeouts yet.
    done.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    proxy.restore();

    finished_in_one_attempt(&app, &fal, &key, id, running).await;
    assert!(polled >= 2, "the provider was polled {polled} times");
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(50), Some(0)),
        "{b}"
    );
}

/// Follow a generation's event stream to its end, in the background.
fn follow(
    app: &TestApp,
    key: &str,
    id: &str,
) -> tokio::task::JoinHandle<(u16, Vec<(String, Value)>)> {
    let (address, client, key, id) = (
        app.address.clone(),
        app.client.clone(),
        key.to_owned(),
        id.to_owned(),
    );
    tokio::spawn(async move { read_sse(&client, &address, &key, &id, None).await })
}

/// Read a whole SSE response: (id, data) of each event.
async fn read_sse(
    client: &reqwest::Client,
    address: &str,
    key: &str,
    id: &str,
    last_event_id: Option<&str>,
) -> (u16, Vec<(String, Value)>) {
    let mut req = client
        .get(format!("{address}/v1/generations/{id}/events"))
        .bearer_auth(key);
    if let Some(l) = last_event_id {
        req = req.header("Last-Event-ID", l);
    }
    let mut r = req.send().await.unwrap();
    let status = r.status().as_u16();
    if status != 200 {
        return (status, Vec::new());
    }
    let mut text = String::new();
    let read = async {
        while let Some(chunk) = r.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the stream ends after the terminal event");
    let mut events = Vec::new();
    for block in text.split("\n\n") {
        let mut id = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().to_owned());
            }
            if let Some(v) = line.strip_prefix("data:") {
                data = serde_json::from_str::<Value>(v.trim()).ok();
            }
        }
        if let (Some(i), Some(d)) = (id, data) {
            events.push((i, d));
        }
    }
    (status, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_event_stream_delivers_every_status_change_in_order_and_resumes() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let (_, bob) = funded(&app, 0).await;
    let (_, g, _) = app.submit(&key, None, video("streamed")).await;
    let id = g["id"].as_str().unwrap().to_owned();
    assert_eq!(
        read_sse(&app.client, &app.address, &bob, &id, None).await.0,
        404
    );

    // A client follows from the start while the worker runs it.
    let follower = follow(&app, &key, &id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.run_generations().await;
    let (status, events) = follower.await.unwrap();
    assert_eq!(status, 200);
    let statuses: Vec<&str> = events
        .iter()
        .map(|(_, d)| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["queued", "running", "succeeded"]);
    let ids: Vec<&str> = events.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(ids, vec!["1", "2", "3"]);

    // Resuming after the first event delivers the rest, without loss.
    let (_, resumed) = read_sse(&app.client, &app.address, &key, &id, Some("1")).await;
    let ids: Vec<&str> = resumed.iter().map(|(i, _)| i.as_str()).collect();
    assert_eq!(ids, vec!["2", "3"]);
    // Resuming after the terminal event: nothing more, said at once (204
    // stops a browser's EventSource; an empty stream kept it reconnecting).
    for last in ["3", "9"] {
        assert_eq!(
            read_sse(&app.client, &app.address, &key, &id, Some(last))
                .await
                .0,
            204
        );
    }
    // An id this stream never gives is refused (it replayed from the start).
    for last in ["abc", "-1", "99999999999", ""] {
        assert_eq!(
            read_sse(&app.client, &app.address, &key, &id, Some(last))
                .await
                .0,
            400,
            "Last-Event-ID {last:?}"
        );
    }
}

/// A stream is not authorised once for its quarter of an hour: revoking
/// the key that opened it ends it, though its generation is still queued.
#[tokio::test]
async fn the_event_stream_ends_once_its_key_is_revoked() {
    let app = spawn_app_with(&[]).await;
    let (account, key) = funded(&app, 100).await;
    let (_, g, _) = app.submit(&key, None, video("revoked midway")).await;
    let id = g["id"].as_str().unwrap().to_owned();
    let follower = follow(&app, &key, &id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!follower.is_finished(), "open while the key holds");
    let mut conn = app.db.conn().await;
    let key_id: Uuid = sqlx::query_scalar("select key_id from api_keys where account_id = $1")
        .bind(account)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    slate_events::access::revoke_key(&mut conn, account, key_id, slate_events::Metadata::system())
        .await
        .unwrap();
    let (status, events) = follower.await.unwrap();
    assert_eq!(status, 200);
    let statuses: Vec<&str> = events
        .iter()
        .map(|(_, d)| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued"], "ended without a terminal event");
    assert_eq!(
        read_sse(&app.client, &app.address, &key, &id, None).await.0,
        401
    );
}

/// The Standard Webhooks signature, computed here from the documented scheme.
fn standard_webhooks_signature(secret: &str, id: &str, timestamp: &str, body: &str) -> String {
    use base64::Engine;
    use hmac::{Hmac, KeyInit, Mac};
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test]
async fn a_completion_webhook_is_signed_retried_under_the_same_id_and_private_urls_are_refused() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let receiver = MockServer::start().await;
    let port = receiver.address().port();
    let allow = format!("127.0.0.1:{port}");
    let app = spawn_app_with(&[("SLATE_WEBHOOK_ALLOWLIST", &allow)]).await;
    let (_, key) = funded(&app, 100).await;

    // Loopback without the allow-list entry: refused at submission.
    let mut refused = video("hooked");
    refused["webhook_url"] = "http://127.0.0.1:9/hook".into();
    let (status, body, _) = app.submit(&key, None, refused).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("webhook_url_not_allowed")),
        "{body}"
    );
    for url in [
        "http://169.254.169.254/latest",
        "http://10.0.0.8/x",
        "ftp://example.com/x",
        "http://[::1]:80/x",
    ] {
        let mut b = video("hooked");
        b["webhook_url"] = url.into();
        assert_eq!(app.submit(&key, None, b).await.0, 422, "{url}");
    }

    let mut body = video("hooked");
    body["webhook_url"] = format!("http://127.0.0.1:{port}/hooks/slate").into();
    let (status, g, _) = app.submit(&key, None, body).await;
    assert_eq!(status, 202, "{g}");
    let id: Uuid = g["id"].as_str().unwrap().parse().unwrap();

    Mock::given(method("POST"))
        .and(path("/hooks/slate"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .mount(&receiver)
        .await;
    Mock::given(method("POST"))
        .and(path("/hooks/slate"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;

    app.run_generations().await;
    let jobs: i64 =
        sqlx::query_scalar("select count(*) from apalis.jobs where job_type = 'slate.webhooks'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(jobs, 1, "the webhook job was queued with the outcome");
    let w = slate_workers::webhooks::WebhookWorker::new(app.db.pool.clone(), vec![allow.clone()])
        .unwrap();
    use slate_workers::webhooks::{Delivery, deliver};
    // A host that does not resolve at delivery (the resolver failed, or the
    // receiver's DNS is down) is tried again, not refused. (It was refused:
    // the notification was lost for good on a DNS blip.)
    let set_url = async |url: String| {
        sqlx::query("update generation_inputs set webhook_url = $2 where generation_id = $1")
            .bind(id)
            .bind(url)
            .execute(&app.db.pool)
            .await
            .unwrap();
    };
    set_url("http://slate-webhook-receiver.invalid/hooks/slate".into()).await;
    let unresolved = deliver(&w, id).await.unwrap();
    assert!(
        matches!(unresolved, Delivery::Retry(ref r) if r.contains("did not resolve")),
        "{unresolved:?}"
    );
    set_url(format!("http://127.0.0.1:{port}/hooks/slate")).await;
    assert!(matches!(deliver(&w, id).await.unwrap(), Delivery::Retry(ref r) if r == "HTTP 500"));
    assert_eq!(deliver(&w, id).await.unwrap(), Delivery::Delivered);

    let (_, secret) = app.get_as("/v1/webhooks/secret", Some(&key)).await;
    let secret = secret["secret"].as_str().unwrap().to_owned();
    let received = receiver.received_requests().await.unwrap();
    assert_eq!(received.len(), 2);
    let ids: Vec<&str> = received
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap())
        .collect();
    assert_eq!(ids[0], ids[1], "a retry keeps the message id");
    for r in &received {
        let msg_id = r.headers["webhook-id"].to_str().unwrap();
        let ts = r.headers["webhook-timestamp"].to_str().unwrap();
        let body = String::from_utf8(r.body.clone()).unwrap();
        assert_eq!(
            r.headers["webhook-signature"].to_str().unwrap(),
            standard_webhooks_signature(&secret, msg_id, ts, &body)
        );
        let payload: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(payload["type"], "generation.succeeded");
        assert_eq!(
            payload["data"]["id"].as_str(),
            Some(id.to_string().as_str())
        );
        assert!(!body.contains("hooked"), "the prompt is not in the webhook");
    }
}

/// A reservation's hold is the net for a generation whose job vanished,
/// not a limit on a slow one: past its hold, a generation whose job is
/// still waiting (a backlog) or has attempts to go keeps its credits
/// reserved and is billed when it succeeds. (Before, the sweeper released
/// both, and the slow one then succeeded unbilled.) One whose job is
/// stopped for good, unfinished and unchanged for ten minutes, is failed
/// (`job_lost`), which releases its credits; it stayed running for good.
#[tokio::test]
async fn an_expired_hold_is_released_only_once_its_generations_job_is_gone() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let (_, slow, _) = app.submit(&key, None, video("behind a backlog")).await;
    let (_, lost, _) = app.submit(&key, None, video("its job is lost")).await;
    let slow: Uuid = slow["id"].as_str().unwrap().parse().unwrap();
    let lost: Uuid = lost["id"].as_str().unwrap().parse().unwrap();
    let after_the_hold = chrono::Utc::now() + chrono::Duration::hours(3);
    let report = slate_workers::sweeper::sweep(&app.db.pool, after_the_hold)
        .await
        .unwrap();
    assert_eq!(report.holds_released, 0, "both jobs are waiting");

    // One job fails for good without recording an outcome (as a killed or
    // deleted job would): its hold goes. The other one's job failed once
    // and has attempts to go: its hold stays.
    for (id, status, attempts) in [(lost, "Killed", 1), (slow, "Failed", 1)] {
        sqlx::query(
            "update apalis.jobs set status = $2, attempts = $3
              where job_type = 'slate.generations'
                and convert_from(job, 'UTF8')::jsonb ->> 'generation_id' = $1::text",
        )
        .bind(id)
        .bind(status)
        .bind(attempts)
        .execute(&app.db.pool)
        .await
        .unwrap();
    }
    let report = slate_workers::sweeper::sweep(&app.db.pool, after_the_hold)
        .await
        .unwrap();
    // The generation whose job is gone is failed (`job_lost`), which
    // releases its credits; the other one keeps its hold.
    assert_eq!(
        (report.generations_abandoned, report.holds_released),
        (1, 0)
    );
    let reservations: Vec<(Uuid, String)> = sqlx::query_as(
        "select generation_id, status from credit_reservations order by generation_id = $1",
    )
    .bind(slow)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        reservations,
        [(lost, "released".to_owned()), (slow, "reserved".to_owned())]
    );
    let (_, g) = app
        .get_as(&format!("/v1/generations/{lost}"), Some(&key))
        .await;
    assert_eq!(
        (g["status"].as_str(), g["failure_code"].as_str()),
        (Some("failed"), Some("job_lost")),
        "{g}"
    );

    // The slow one runs at last, and is billed.
    let w = worker(&app);
    slate_workers::generations::attempt(&w, slow, 2).await;
    assert_eq!(settled(&app, &key, slow).await, ("succeeded".into(), 96, 0));
}

/// A retry of a running generation is read by its worker; the owner's
/// cancellation (asked for, the generation running with no provider job
/// submitted) commits before the worker records the start. The start then
/// reports it, the attempt ends the generation canceled and released, and
/// no provider is called. (The start went on: the provider ran and the
/// generation was billed for a cancellation asked for before the call.)
/// The attempt is held between its read and its start by the lock an
/// account's deletion takes (`generations::hold_starts`).
#[tokio::test]
async fn a_retry_whose_cancellation_came_after_its_worker_read_it_is_not_started() {
    use slate_events::generations::Start;
    let app = spawn_app_with(&[]).await;
    let (account, key) = funded(&app, 100).await;
    let (_, g, _) = app.submit(&key, None, video("asked to stop")).await;
    let id: Uuid = g["id"].as_str().unwrap().parse().unwrap();
    let read = || async {
        slate_events::generations::work(&mut *app.db.conn().await, id)
            .await
            .unwrap()
            .unwrap()
            .generation
    };
    let app_ref = &app;
    let start = move |g: slate_events::generations::Generation, attempt: i32| async move {
        slate_events::generations::record_started(
            &mut *app_ref.db.conn().await,
            &g,
            attempt,
            &slate_events::Metadata::system(),
        )
        .await
        .unwrap()
    };
    // The first attempt started, and failed before reaching the provider.
    assert_eq!(start(read().await, 1).await, Start::Running);
    let as_the_retry_read_it = read().await;
    assert_eq!(
        (
            as_the_retry_read_it.status.as_str(),
            as_the_retry_read_it.cancel_requested
        ),
        ("running", false)
    );
    let (status, body) = cancel(&app, &key, id).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        start(as_the_retry_read_it, 2).await,
        Start::CancelRequested,
        "the attempt must not go to the provider"
    );
    // (An attempt that reads it now finds it so at once.)
    let w = worker(&app);
    slate_workers::generations::attempt(&w, id, 2).await;
    assert_eq!(settled(&app, &key, id).await, ("canceled".into(), 100, 0));
    // What an attempt does with that: held after its read, it finds the
    // cancellation at its start and ends the generation canceled, unbilled.
    let (_, g, _) = app.submit(&key, None, video("asked to stop too")).await;
    let id: Uuid = g["id"].as_str().unwrap().parse().unwrap();
    let work = slate_events::generations::work(&mut *app.db.conn().await, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(start(work.generation, 1).await, Start::Running);
    let mut held = app.db.pool.begin().await.unwrap();
    slate_events::generations::hold_starts(&mut held, account)
        .await
        .unwrap();
    let w = worker(&app);
    let attempt = tokio::spawn(async move { slate_workers::generations::attempt(&w, id, 2).await });
    app.db
        .until_waiting_for_a_lock(&attempt, "the attempt never started")
        .await;
    let (status, body) = cancel(&app, &key, id).await;
    assert_eq!(status, 202, "{body}");
    held.rollback().await.unwrap();
    attempt.await.unwrap();
    assert_eq!(settled(&app, &key, id).await, ("canceled".into(), 100, 0));
    let log = app.db.generation_log(id).await;
    assert_eq!(
        log,
        [
            "GenerationRequested",
            "GenerationStarted",
            "GenerationCancelRequested",
            "GenerationCanceled"
        ]
    );
}

/// A worker reads a queued generation; its cancellation commits before the
/// worker records the start. The start then reports the generation
/// finished, so the attempt goes no further (no provider call, which would
/// be paid for a canceled generation); it stays canceled and released, and
/// its log ends with the cancellation.
#[tokio::test]
async fn a_generation_canceled_after_its_worker_read_it_is_not_started() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    // A queued generation, as its worker reads it, and that worker's start.
    let read = |prompt: &'static str| {
        let (app, key) = (&app, &key);
        async move {
            let (_, g, _) = app.submit(key, None, video(prompt)).await;
            let id: Uuid = g["id"].as_str().unwrap().parse().unwrap();
            let work = slate_events::generations::work(&mut *app.db.conn().await, id)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(work.generation.status, "queued");
            (id, work.generation)
        }
    };
    let app_ref = &app;
    let start = move |g: slate_events::generations::Generation| async move {
        slate_events::generations::record_started(
            &mut *app_ref.db.conn().await,
            &g,
            1,
            &slate_events::Metadata::system(),
        )
        .await
        .unwrap()
    };
    let (id, g) = read("canceled at once").await;
    let (status, body) = cancel(&app, &key, id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        start(g).await,
        slate_events::generations::Start::Finished,
        "the attempt must not go on"
    );
    assert_eq!(settled(&app, &key, id).await, ("canceled".into(), 100, 0));
    // Nor is a start recorded after its end (a follower saw `canceled`,
    // then `running`).
    let log = app.db.generation_log(id).await;
    assert_eq!(log, ["GenerationRequested", "GenerationCanceled"]);
    let (_, events) = read_sse(&app.client, &app.address, &key, &id.to_string(), None).await;
    let statuses: Vec<&str> = events
        .iter()
        .map(|(_, d)| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["queued", "canceled"]);
    // And a generation still queued starts.
    let (_, g) = read("started").await;
    assert_eq!(start(g).await, slate_events::generations::Start::Running);
}

#[tokio::test]
async fn a_generation_past_its_deadline_is_canceled_unbilled() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let mut body = video("late");
    body["deadline_seconds"] = 60.into();
    let (_, g, _) = app.submit(&key, None, body).await;
    let id = g["id"].as_str().unwrap().to_owned();
    // Nothing happens before the deadline…
    let early = slate_workers::sweeper::sweep(&app.db.pool, chrono::Utc::now())
        .await
        .unwrap();
    assert_eq!(early.generations_past_deadline, 0);
    // …and after it, the sweeper cancels it and the credits come back.
    let late = slate_workers::sweeper::sweep(
        &app.db.pool,
        chrono::Utc::now() + chrono::Duration::seconds(61),
    )
    .await
    .unwrap();
    assert_eq!(late.generations_past_deadline, 1);
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(&key))
        .await;
    assert_eq!(
        (g["status"].as_str(), g["failure_code"].as_str()),
        (Some("canceled"), Some("deadline_passed"))
    );
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(100), Some(0))
    );
    let job: (String, Option<chrono::DateTime<chrono::Utc>>) = sqlx::query_as(
        "select status::text, lock_at from apalis.jobs
          where convert_from(job, 'UTF8')::jsonb ->> 'generation_id' = $1",
    )
    .bind(&id)
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        job,
        ("Done".to_owned(), None),
        "its job withdrawn, never taken (so not timed as a job that ran)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canceling_a_running_generation_calls_the_provider_and_releases_unless_it_finished() {
    let app = spawn_app_with(&[]).await;
    let (_, key) = funded(&app, 100).await;
    let mut body = video("long render");
    body["parameters"]["pending_polls"] = 1000.into();
    let (_, g, _) = app.submit(&key, None, body).await;
    let id: Uuid = g["id"].as_str().unwrap().parse().unwrap();
    let w = worker(&app);
    let running = tokio::spawn(async move { slate_workers::generations::attempt(&w, id, 1).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, g) = app
            .get_as(&format!("/v1/generations/{id}"), Some(&key))
            .await;
        if g["status"] == "running" && g["attempts"] == 1 {
            let handle: Option<String> = sqlx::query_scalar(
                "select provider_handle from generations where generation_id = $1",
            )
            .bind(id)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
            if handle.is_some() {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never submitted to the provider"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, c) = cancel(&app, &key, id).await;
    assert_eq!(
        (status, c["cancel_requested"].as_bool()),
        (202, Some(true)),
        "{c}"
    );
    let outcome = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        slate_workers::generations::AttemptOutcome::Finished
    );
    let (_, g) = app
        .get_as(&format!("/v1/generations/{id}"), Some(&key))
        .await;
    assert_eq!(g["status"], "canceled", "{g}");
    let b = app.balance(&key).await;
    assert_eq!(
        (b["available"].as_i64(), b["reserved"].as_i64()),
        (Some(100), Some(0))
    );
}

/// An account's first webhook-secret requests at once all get its one
/// secret. (The second of two first uses used to find no row: its insert
/// waited for the first's and did nothing, and its read's snapshot predated
/// the first's commit: a 500 the hostile run met.)
#[tokio::test]
async fn concurrent_first_requests_for_the_webhook_secret_all_get_the_same_one() {
    let db = crate::harness::TestDb::new().await;
    for round in 0..5 {
        let mut conn = db.conn().await;
        let account = slate_events::accounts::create_account(
            &mut conn,
            &format!("secret-{round}@example.com"),
            false,
            slate_events::Metadata::system(),
        )
        .await
        .unwrap();
        drop(conn);
        let asks = (0..12).map(|_| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.acquire().await.unwrap();
                slate_workers::webhooks::secret_for(&mut conn, account).await
            })
        });
        let secrets: Vec<String> = futures::future::join_all(asks)
            .await
            .into_iter()
            .map(|r| r.unwrap().expect("every first request gets the secret"))
            .collect();
        assert!(secrets.iter().all(|s| s == &secrets[0]), "{secrets:?}");
    }
}

/// `/metrics`' generations by kind and status read like a count of the
/// whole table (what a scrape did before the fold) through a fold in steps,
/// an account's purge (its folded generations come off the totals), and a
/// rebuild of the projection (the totals start again).
#[tokio::test]
async fn generation_counts_read_like_the_table_through_folds_purges_and_rebuilds() {
    use slate_events::catalog::{AccountPurged, DomainEvent};
    use slate_events::projections::{self, Projection};

    let app = spawn_app_with(&[]).await;
    let pool = &app.db.pool;
    let (alice, alice_key) = funded(&app, 100).await;
    let (_bob, bob_key) = funded(&app, 100).await;
    for (key, n) in [(&alice_key, 2), (&bob_key, 1)] {
        for i in 0..n {
            let (status, body, _) = app
                .submit(key, Some(&format!("c{i}")), video("a quiet harbour"))
                .await;
            assert_eq!(status, 202, "{body}");
        }
    }
    app.run_generations().await;
    // One more of Bob's stays queued.
    let (status, body, _) = app
        .submit(&bob_key, Some("c9"), video("a quiet harbour"))
        .await;
    assert_eq!(status, 202, "{body}");

    let gauge = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("slate_generations{") && !l.ends_with(" 0"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let table = || async {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "select kind, status, count(*) from generations group by 1, 2 order by 1, 2",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(k, s, n)| format!("slate_generations{{kind=\"{k}\",status=\"{s}\"}} {n}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        table().await,
        [
            r#"slate_generations{kind="video",status="queued"} 1"#,
            r#"slate_generations{kind="video",status="succeeded"} 3"#
        ]
    );
    assert_eq!(gauge(&app.metrics().await), table().await);

    // Finished an hour ago (past the fold's margin), folded two a step.
    let finished_an_hour_ago =
        "update generations set finished_at = finished_at - interval '1 hour'
                                 where finished_at is not null";
    sqlx::query(finished_an_hour_ago)
        .execute(pool)
        .await
        .unwrap();
    let now = chrono::Utc::now();
    let (folded, _) = slate_workers::generations::fold_counts_by(pool, now, 2)
        .await
        .unwrap();
    assert_eq!(folded, 3);
    let live: i64 = sqlx::query_scalar(
        "select count(*) from generations
          where finished_at >= (select upto from generation_count_watermark)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(live, 0, "a scrape reads no folded generation");
    assert_eq!(gauge(&app.metrics().await), table().await);

    // Alice's account is purged: her two folded generations come off.
    let mut conn = app.db.conn().await;
    slate_events::store::record_once(
        &mut conn,
        alice,
        &format!("account-purged:{alice}"),
        DomainEvent::AccountPurged(AccountPurged { account_id: alice }),
    )
    .await
    .unwrap();
    drop(conn);
    let after_purge = gauge(&app.metrics().await);
    assert_eq!(after_purge, table().await);
    assert!(
        after_purge.contains(&r#"slate_generations{kind="video",status="succeeded"} 1"#.to_owned()),
        "{after_purge:?}"
    );

    // A rebuild stamps the generations from their events again (now, not
    // an hour ago) and the totals start again: still the table's count,
    // and a later fold takes Bob's finished one once.
    projections::rebuild(pool, Projection::Generations)
        .await
        .unwrap();
    assert!(
        projections::verify(pool, &[Projection::Generations])
            .await
            .unwrap()
            .is_clean()
    );
    assert_eq!(gauge(&app.metrics().await), after_purge);
    sqlx::query(finished_an_hour_ago)
        .execute(pool)
        .await
        .unwrap();
    let (folded, _) = slate_workers::generations::fold_counts_by(pool, now, 2)
        .await
        .unwrap();
    assert_eq!(folded, 1);
    assert_eq!(gauge(&app.metrics().await), after_purge);
}
