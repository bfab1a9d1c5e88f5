//! The HTTP server on port 0 against real PostgreSQL and Redis.

use serde_json::Value;
use slate::config::Config;
use slate::http::AppState;

use crate::harness::{TestDb, redis_url};

pub struct TestApp {
    pub address: String,
    pub db: TestDb,
    pub client: reqwest::Client,
}

/// An app on port 0 with its own database; `env` overrides configuration.
pub async fn spawn_app_with(env: &[(&str, &str)]) -> TestApp {
    let db = TestDb::new().await;
    let pool = db.pool.clone();
    serve_app(db, pool, env).await
}

/// Serve `db` through `pool` (which may reach it another way than the
/// test's own pool) on port 0; `env` overrides configuration.
pub async fn serve_app(db: TestDb, pool: sqlx::PgPool, env: &[(&str, &str)]) -> TestApp {
    let address = serve(&db.url, pool, env).await;
    TestApp {
        address,
        db,
        client: reqwest::Client::new(),
    }
}

/// A server on port 0 for the database at `url`, through `pool`; its
/// address.
async fn serve(url: &str, pool: sqlx::PgPool, env: &[(&str, &str)]) -> String {
    let config = Config::from_lookup(|k| {
        env.iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
            .or_else(|| match k {
                "DATABASE_URL" => Some(url.to_owned()),
                "REDIS_URL" => Some(redis_url()),
                _ => None,
            })
    })
    .unwrap();
    let state = AppState::new(config, pool).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(slate::server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    address
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

impl TestApp {
    /// Another web process on this app's database, configured by `env`
    /// (another deployment's settings); its address.
    pub async fn another_process(&self, env: &[(&str, &str)]) -> String {
        serve(&self.db.url, self.db.pool.clone(), env).await
    }

    /// A new staff account and an API key for it.
    pub async fn staff(&self) -> (uuid::Uuid, String) {
        let mut conn = self.db.conn().await;
        let email = format!("staff-{}@example.com", uuid::Uuid::new_v4().simple());
        let staff = slate_events::accounts::create_account(
            &mut conn,
            &email,
            true,
            slate_events::Metadata::system(),
        )
        .await
        .unwrap();
        let key = crate::credits::new_key(&mut conn, staff).await;
        (staff, key)
    }

    pub async fn get(&self, path: &str) -> (u16, Value, reqwest::header::HeaderMap) {
        let r = self
            .client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, r.json().await.unwrap_or(Value::Null), headers)
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn health_and_readiness_answer_when_postgres_and_redis_do() {
    let app = spawn_app().await;
    let (status, body, headers) = app.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert!(headers.contains_key("x-request-id"));
    let (status, body, _) = app.get("/readyz").await;
    assert_eq!(
        status, 200,
        "{body} — is Redis running? scripts/services starts it"
    );
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["redis"], "ok");
    let _ = &app.db;
}

/// A client has `SLATE_REQUEST_READ_SECS` for a request's headers and as
/// long again for its body: a trickled body is answered 408
/// `request_timeout` and its connection closed; headers never finished, or
/// an idle kept-alive connection, are closed. (Both were held for ever.)
#[tokio::test]
async fn slow_headers_and_bodies_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(&[("SLATE_REQUEST_READ_SECS", "1")]).await;
    let addr = app.address.trim_start_matches("http://").to_owned();
    // Sends `request` on a connection of its own; what came back until the
    // server closed it, and when it did.
    let exchange = |request: &'static [u8]| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let started = std::time::Instant::now();
            s.write_all(request).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out))
                .await
                .expect("the server closes the connection")
                .ok();
            (
                String::from_utf8_lossy(&out).into_owned(),
                started.elapsed(),
            )
        }
    };
    let a_second = std::time::Duration::from_millis(900);

    // A body that stops arriving.
    let (answer, _) = exchange(
        b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");

    // Headers that never end: closed, unanswered, once the second passed.
    let (answer, after) = exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    assert!(answer.is_empty() && after >= a_second, "{answer} {after:?}");

    // A whole request is answered; the connection, left idle, is closed a
    // second later.
    let (answer, after) = exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && after >= a_second,
        "{answer} {after:?}"
    );
}

#[tokio::test]
async fn readiness_fails_with_503_when_redis_is_unreachable() {
    // Nothing listens on port 1.
    let app = spawn_app_with(&[("REDIS_URL", "redis://127.0.0.1:1")]).await;
    let (status, body, _) = app.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["redis"], "unreachable");
    // Liveness does not depend on anything.
    assert_eq!(app.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn an_unknown_route_is_a_404() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/nope", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}

#[tokio::test]
async fn responses_are_never_cached_and_carry_the_security_headers_hsts_only_behind_tls() {
    let app = spawn_app().await;
    let (_, key) = crate::billing::key_for(&app).await;
    let get = |path: &str, https: bool| {
        let mut req = app
            .client
            .get(format!("{}{path}", app.address))
            .bearer_auth(&key);
        if https {
            req = req.header("x-forwarded-proto", "https");
        }
        req.send()
    };
    let r = get("/v1/credits", false).await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert!(!h.contains_key("strict-transport-security"), "plain HTTP");
    assert!(
        !h.contains_key("content-security-policy"),
        "JSON, not a page"
    );
    let r = get("/v1/credits", true).await.unwrap();
    assert_eq!(
        r.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    // Errors too, and the console's pages get a strict CSP.
    let r = app
        .client
        .get(format!("{}/admin", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
}

#[tokio::test]
async fn a_client_request_id_is_kept_only_when_it_is_a_plain_token() {
    let app = spawn_app().await;
    let echo = |id: &'static str| {
        let app = &app;
        async move {
            let r = app
                .client
                .get(format!("{}/healthz", app.address))
                .header("x-request-id", id)
                .send()
                .await
                .unwrap();
            r.headers()["x-request-id"].to_str().unwrap().to_owned()
        }
    };
    assert_eq!(echo("req-2026.12_02:abc").await, "req-2026.12_02:abc");
    for forged in [
        "abc\" level=error msg=\"forged",
        "a b",
        "<script>",
        "é",
        "x;drop",
    ] {
        let got = echo(forged).await;
        assert_ne!(got, forged);
        assert!(
            uuid::Uuid::parse_str(&got).is_ok(),
            "{forged:?} was replaced by a fresh id, got {got:?}"
        );
    }
    let long: &'static str = Box::leak("a".repeat(129).into_boxed_str());
    assert_ne!(echo(long).await, long);
}

/// Requests no route took are counted too: an unknown path as "unmatched",
/// a wrong method on its route, and a made-up method as "other" (a client
/// cannot add series to `/metrics`).
#[tokio::test]
async fn metrics_count_unknown_routes_and_wrong_methods() {
    let app = spawn_app().await;
    let send = |method: &str, path: &str| {
        app.client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", app.address),
            )
            .send()
    };
    assert_eq!(send("GET", "/v1/nope").await.unwrap().status(), 404);
    assert_eq!(send("GET", "/v1/nope/either").await.unwrap().status(), 404);
    assert_eq!(send("PUT", "/v1/credits").await.unwrap().status(), 405);
    assert_eq!(send("BREW", "/v1/nope").await.unwrap().status(), 404);
    let text = app.metrics().await;
    for line in [
        r#"slate_http_requests_total{method="GET",route="unmatched",status="404"} 2"#,
        r#"slate_http_requests_total{method="other",route="unmatched",status="404"} 1"#,
        r#"slate_http_requests_total{method="PUT",route="/v1/credits",status="405"} 1"#,
    ] {
        assert!(text.contains(line), "{line} is missing:\n{text}");
    }
    assert!(!text.contains("BREW"), "{text}");
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_format() {
    let app = spawn_app().await;
    let r = app
        .client
        .get(format!("{}/v1/nope", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let r = app
        .client
        .put(format!("{}/v1/credits", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    // A query parameter of the wrong type is ours too, not axum's text.
    let (_, key) = crate::billing::key_for(&app).await;
    let r = app
        .client
        .get(format!("{}/v1/generations?limit=abc", app.address))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_query");
}

/// The lines of `/metrics`' job-duration histogram for `queue`.
fn job_histogram(text: &str, queue: &str) -> Vec<String> {
    let label = format!("\"{queue}\"");
    text.lines()
        .filter(|l| l.starts_with("slate_job_duration_seconds") && l.contains(&label))
        .map(str::to_owned)
        .collect()
}

/// Finished jobs leave the queue's table after their retention, checked at
/// most hourly by the maintenance sweep; jobs that may still run stay
/// whatever their age; and the job-duration histogram of `/metrics` keeps
/// counting the deleted ones (a counter never goes down): the sweep folds
/// Done jobs' durations into totals before the retention may delete them,
/// and a scrape reads only the jobs finished since.
#[tokio::test]
async fn finished_jobs_are_deleted_after_their_retention_and_stay_counted_in_metrics() {
    use slate_workers::diagnostics::{DiagnosticJob, QUEUE};
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let now = chrono::Utc::now();
    // (status, finished this many days ago, attempts, max attempts)
    let jobs = [
        ("Done", 8, 1, 1),     // past the 7 days: deleted
        ("Done", 8, 1, 1),     // deleted
        ("Done", 1, 1, 1),     // kept
        ("Killed", 8, 1, 1),   // dead, within 30 days: kept
        ("Killed", 31, 1, 1),  // deleted
        ("Failed", 31, 5, 5),  // no attempt left: deleted
        ("Failed", 40, 1, 5),  // will be retried: kept
        ("Pending", 40, 0, 5), // kept
    ];
    let mut ids = Vec::new();
    for (status, days, attempts, max_attempts) in jobs {
        let mut conn = pool.acquire().await.unwrap();
        let _ = slate_workers::jobs::enqueue(&mut conn, QUEUE, &DiagnosticJob::Ping, 1)
            .await
            .unwrap();
        let id: String = sqlx::query_scalar(
            "update apalis.jobs set status = $1, attempts = $2, max_attempts = $3,
                    done_at = case when $1 = 'Pending' then null else $4 end,
                    lock_at = case when $1 = 'Pending' then null else $4 - interval '2 seconds' end
              where id = (select id from apalis.jobs where status = 'Pending' and attempts = 0
                           and job_type = $5 limit 1)
             returning id",
        )
        .bind(status)
        .bind(attempts)
        .bind(max_attempts)
        .bind(now - chrono::Duration::days(days))
        .bind(QUEUE)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        ids.push(id);
    }
    let histogram = |text: &str| job_histogram(text, QUEUE);
    let before = histogram(&app.metrics().await);
    assert!(
        before.contains(&format!(
            "slate_job_duration_seconds_count{{queue=\"{QUEUE}\"}} 3"
        )),
        "{before:?}"
    );
    assert!(
        before.contains(&format!(
            "slate_job_duration_seconds_bucket{{queue=\"{QUEUE}\",le=\"5\"}} 3"
        )),
        "{before:?}"
    );

    let report = slate_workers::sweeper::sweep(pool, now).await.unwrap();
    // The three Done jobs are folded into the totals first; only then may
    // the retention delete them.
    assert_eq!(report.job_durations_folded, 3);
    assert_eq!(report.jobs_deleted, 4);
    let mut left: Vec<String> =
        sqlx::query_scalar("select id from apalis.jobs where job_type = $1")
            .bind(QUEUE)
            .fetch_all(pool)
            .await
            .unwrap();
    left.sort();
    let mut kept: Vec<String> = [2, 3, 6, 7].iter().map(|&i| ids[i].clone()).collect();
    kept.sort();
    assert_eq!(left, kept);
    // The histogram is the same, to the line.
    let text = app.metrics().await;
    assert_eq!(histogram(&text), before);
    // The queue's gauge counts the jobs that have not succeeded; the Done
    // ones are the histogram's count.
    let gauge = |status: &str| format!("slate_jobs{{queue=\"{QUEUE}\",status=\"{status}\"}}");
    assert!(text.contains(&format!("{} 1\n", gauge("Killed"))), "{text}");
    assert!(
        text.contains(&format!("{} 1\n", gauge("Pending"))),
        "{text}"
    );
    assert!(!text.contains(&gauge("Done")), "{text}");

    // A job finished since the watermark is read from the table, then folded
    // by a later sweep, and counted once throughout.
    let upto: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select upto from job_duration_watermark")
            .fetch_one(pool)
            .await
            .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let _ = slate_workers::jobs::enqueue(&mut conn, QUEUE, &DiagnosticJob::Ping, 1)
        .await
        .unwrap();
    sqlx::query(
        "update apalis.jobs set status = 'Done', attempts = 1,
                done_at = $1, lock_at = $1 - interval '300 milliseconds'
          where job_type = $2 and status = 'Pending' and id <> $3",
    )
    .bind(upto + chrono::Duration::milliseconds(1))
    .bind(QUEUE)
    .bind(&ids[7])
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let live = histogram(&app.metrics().await);
    assert!(
        live.contains(&format!(
            "slate_job_duration_seconds_count{{queue=\"{QUEUE}\"}} 4"
        )),
        "{live:?}"
    );
    assert!(
        live.contains(&format!(
            "slate_job_duration_seconds_bucket{{queue=\"{QUEUE}\",le=\"0.5\"}} 1"
        )),
        "{live:?}"
    );

    // Within the hour the retention does not run again; after it, it does.
    sqlx::query(
        "update apalis.jobs set done_at = $1, lock_at = $1 - interval '2 seconds' where id = $2",
    )
    .bind(now - chrono::Duration::days(9))
    .bind(&ids[2])
    .execute(pool)
    .await
    .unwrap();
    let soon = slate_workers::sweeper::sweep(pool, now + chrono::Duration::minutes(30))
        .await
        .unwrap();
    assert_eq!(soon.jobs_deleted, 0);
    assert_eq!(soon.job_durations_folded, 1);
    assert_eq!(histogram(&app.metrics().await), live);
    let later = slate_workers::sweeper::sweep(pool, now + chrono::Duration::minutes(61))
        .await
        .unwrap();
    assert_eq!(later.jobs_deleted, 1);
    assert_eq!(later.job_durations_folded, 0);
    assert_eq!(histogram(&app.metrics().await), live);
}

/// A fold goes in steps of at most so many jobs a transaction, each ending
/// past every job stamped like its last (jobs sharing a stamp are folded
/// together), and the histogram reads the same throughout.
#[tokio::test]
async fn a_fold_goes_in_steps_and_keeps_jobs_sharing_a_stamp_together() {
    use slate_workers::diagnostics::{DiagnosticJob, QUEUE};
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let now = chrono::Utc::now();
    let mut conn = pool.acquire().await.unwrap();
    for _ in 0..5 {
        let _ = slate_workers::jobs::enqueue(&mut conn, QUEUE, &DiagnosticJob::Ping, 1)
            .await
            .unwrap();
    }
    // Finished an hour ago (three at the same instant), then 50 and 40
    // minutes ago: all past the fold's margin.
    sqlx::query(
        "update apalis.jobs j set status = 'Done', attempts = 1,
                done_at = $1 - make_interval(mins => s.m), lock_at = $1 - make_interval(mins => s.m, secs => 2)
           from (select id, (array[60, 60, 60, 50, 40])[row_number() over (order by id)] m
                   from apalis.jobs where job_type = $2) s
          where j.id = s.id",
    )
    .bind(now)
    .bind(QUEUE)
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let histogram = |text: &str| job_histogram(text, QUEUE);
    let before = histogram(&app.metrics().await);
    let count = format!("slate_job_duration_seconds_count{{queue=\"{QUEUE}\"}} 5");
    assert!(before.contains(&count), "{before:?}");

    // Two a step: the first ends at the third job's stamp (nothing before
    // it), the second takes the three sharing it, the last the other two.
    let folded = slate_workers::jobs::fold_durations_by(pool, now, 2)
        .await
        .unwrap();
    assert_eq!(folded, (5, 3));
    assert_eq!(histogram(&app.metrics().await), before);
    let unfolded: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs
          where status = 'Done' and done_at >= (select upto from job_duration_watermark)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(unfolded, 0);
    let again = slate_workers::jobs::fold_durations_by(pool, now, 2)
        .await
        .unwrap();
    assert_eq!(again, (0, 1));
}

/// With a metrics token configured, `/metrics` answers only a scraper that
/// sends it; without one it is open (as the demo and the tests use it).
#[tokio::test]
async fn metrics_need_the_token_when_one_is_configured() {
    let app = spawn_app_with(&[("SLATE_METRICS_TOKEN", "scrape-7c1f")]).await;
    let get = |auth: Option<&str>| {
        let mut r = app.client.get(format!("{}/metrics", app.address));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    for auth in [
        None,
        Some("Bearer scrape-7c1"),
        Some("Bearer scrape-7c1f0"),
        Some("scrape-7c1f"),
    ] {
        let r = get(auth).await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "metrics_token_invalid");
    }
    let r = get(Some("Bearer scrape-7c1f")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("slate_jobs"));
}

/// A projection far behind is reported at the cap, not counted to the end
/// (that read the whole backlog at every scrape), with the age of the next
/// event it has to apply; the events it has applied already, which come
/// first in the log, are not counted.
#[tokio::test]
async fn projection_lag_is_counted_up_to_its_cap() {
    let app = spawn_app().await;
    slate::bench_scale::fill_log(&app.db.pool, 2_000, "applied")
        .await
        .unwrap();
    slate_events::projections::catch_up(
        &app.db.pool,
        slate_events::projections::Projection::AuditLog,
    )
    .await
    .unwrap();
    let lag = |text: String| {
        let value = move |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}{{projection=\"audit_log\"}} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name}: {text}"))
        };
        (
            value("slate_projection_lag_events"),
            value("slate_projection_lag_seconds"),
        )
    };
    slate::bench_scale::fill_log(&app.db.pool, 5_000, "behind")
        .await
        .unwrap();
    assert_eq!(lag(app.metrics().await).0, 5_000.0);
    slate::bench_scale::fill_log(&app.db.pool, 5_050, "lag-cap")
        .await
        .unwrap();
    let (behind, age) = lag(app.metrics().await);
    assert_eq!(behind, 10_000.0);
    // The log is append-only (its `recorded_at` cannot be moved back): the
    // first event went in moments ago.
    assert!(age > 0.0 && age < 600.0, "{age}");
}
