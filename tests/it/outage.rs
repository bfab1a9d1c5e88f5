//! PostgreSQL going away under a running server: every request answers
//! quickly with 503 `database_unavailable` (and `Retry-After`), never a 500
//! and never a hang, and the server recovers by itself when the database is
//! back. The outage is a TCP proxy in front of the real server that the test
//! cuts (live connections reset, new ones refused) and restores, so other
//! tests on the same PostgreSQL are untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::harness::TestDb;

/// A proxy to PostgreSQL that can be cut and restored.
pub struct Proxy {
    addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, _) = watch::channel(true);
        let proxy = Arc::new(Self { addr, up });
        tokio::spawn(Self::serve(proxy.clone(), Some(listener), target));
        proxy
    }

    async fn serve(self: Arc<Self>, mut listener: Option<TcpListener>, target: SocketAddr) {
        let mut state = self.up.subscribe();
        loop {
            match listener.as_ref() {
                // Down: nothing listens (connections are refused) until up.
                None => {
                    state.wait_for(|up| *up).await.unwrap();
                    listener = Some(bind_again(self.addr).await);
                }
                Some(l) => tokio::select! {
                    accepted = l.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let mut cut = self.up.subscribe();
                        tokio::spawn(async move {
                            let Ok(server) = TcpStream::connect(target).await else { return };
                            let (mut client, mut server) = (client, server);
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                // Both ends are dropped: the connection ends, as
                                // when the server dies.
                                _ = cut.wait_for(|up| !*up) => {}
                            }
                        });
                    }
                    _ = state.wait_for(|up| !*up) => listener = None,
                },
            }
        }
    }

    /// A proxy in front of the server of database URL `url`, and the URL
    /// of the same database through it.
    pub async fn in_front_of(url: &str) -> (Arc<Self>, String) {
        let direct: PgConnectOptions = url.parse().unwrap();
        let target: SocketAddr = tokio::net::lookup_host((direct.get_host(), direct.get_port()))
            .await
            .unwrap()
            .find(SocketAddr::is_ipv4)
            .expect("PostgreSQL on an IPv4 address");
        let proxy = Self::start(target).await;
        let options = direct.host("127.0.0.1").port(proxy.addr.port());
        (proxy, options.to_url_lossy().to_string())
    }

    /// Live connections are reset and new ones refused, as when the server
    /// dies.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

async fn bind_again(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not listen on {addr} again");
}

struct OutageApp {
    server: crate::http::TestApp,
    proxy: Arc<Proxy>,
    key: String,
}

/// A test database with an account and its API key.
async fn db_with_a_key() -> (TestDb, String) {
    let db = TestDb::new().await;
    let mut conn = db.conn().await;
    let account = crate::credits::new_account(&mut conn).await;
    let key = crate::credits::new_key(&mut conn, account).await;
    drop(conn);
    (db, key)
}

async fn outage_app() -> OutageApp {
    let (db, key) = db_with_a_key().await;
    let (proxy, url) = Proxy::in_front_of(&db.url).await;
    // As `slate serve` connects (slate_events::db::connect), through the proxy.
    let pool = slate_events::db::connect(&url, 10).await.unwrap();
    let server = crate::http::serve_app(
        db,
        pool,
        &[
            ("DATABASE_URL", &url),
            ("STRIPE_WEBHOOK_SECRETS", "whsec_outage"),
        ],
    )
    .await;
    OutageApp { server, proxy, key }
}

/// What a request got: status, `Retry-After`, body, and how long it took.
async fn call(
    client: &reqwest::Client,
    req: reqwest::RequestBuilder,
) -> (u16, Option<String>, Value, Duration) {
    let started = Instant::now();
    let r = client
        .execute(req.build().unwrap())
        .await
        .expect("an answer within the client's timeout (a hang fails here)");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = r.json().await.unwrap_or(Value::Null);
    (status, retry, body, started.elapsed())
}

/// Repeat `req` until it answers 200 (up to 20 s after PostgreSQL came
/// back); meanwhile only 503 is allowed.
async fn until_200(client: &reqwest::Client, req: impl Fn() -> reqwest::RequestBuilder) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body, _) = call(client, req()).await;
        if status == 200 {
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "still {status} 20 s after PostgreSQL came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_every_request_gets_a_quick_503_and_service_resumes_by_itself() {
    let app = outage_app().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let credits = || {
        client
            .get(format!("{}/v1/credits", app.server.address))
            .bearer_auth(&app.key)
    };
    let (status, _, body, _) = call(&client, credits()).await;
    assert_eq!(status, 200, "{body}");

    app.proxy.cut();
    let t = chrono::Utc::now().timestamp();
    let event = crate::stripe::fixture(
        "01_checkout_session_completed_pack",
        uuid::Uuid::new_v4(),
        "outage",
    );
    let webhook = || {
        client
            .post(format!("{}/webhooks/stripe", app.server.address))
            .header("content-type", "application/json")
            .header(
                "Stripe-Signature",
                crate::stripe::signature("whsec_outage", t, &event),
            )
            .body(event.clone())
    };
    let requests = [
        ("GET /v1/credits", credits()),
        (
            "POST /v1/generations",
            client
                .post(format!("{}/v1/generations", app.server.address))
                .bearer_auth(&app.key)
                .header("Idempotency-Key", "outage-1")
                .json(&json!({"kind": "script", "provider": "local", "prompt": "a quiet harbour"})),
        ),
        (
            "GET /v1/generations",
            client
                .get(format!("{}/v1/generations", app.server.address))
                .bearer_auth(&app.key),
        ),
        ("POST /webhooks/stripe", webhook()),
        // The staff console: not its sign-in page (the session may be fine).
        (
            "GET /admin",
            client
                .get(format!("{}/admin?q=someone", app.server.address))
                .bearer_auth(&app.key),
        ),
    ];
    for (what, req) in requests {
        let (status, retry, body, took) = call(&client, req).await;
        assert_eq!(status, 503, "{what}: {body}");
        assert_eq!(body["error"]["code"], "database_unavailable", "{what}");
        assert!(retry.is_some(), "{what}: a 503 says when to retry");
        assert!(
            took < Duration::from_secs(10),
            "{what} took {took:?} to answer"
        );
        eprintln!("during the outage {what}: 503 in {took:?}");
    }
    // Deliveries are written two batches at a time, and each write waits the
    // pool's whole acquire timeout (5 s) to fail. The third delivery arrives
    // while both are busy: it is refused when the first write fails, not
    // after a write of its own (which made it wait up to 10 s).
    let burst = (0..3u64).map(|i| {
        let req = webhook();
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500 * i)).await;
            call(&client, req).await
        })
    });
    for (i, answer) in futures::future::join_all(burst)
        .await
        .into_iter()
        .enumerate()
    {
        let (status, _, body, took) = answer.unwrap();
        assert_eq!(status, 503, "delivery {i} of the burst: {body}");
        assert!(
            took < Duration::from_secs(7),
            "delivery {i} of the burst took {took:?} to answer"
        );
        eprintln!("during the outage, delivery {i} of a burst: 503 in {took:?}");
    }
    let (status, _, body, _) = call(
        &client,
        client.get(format!("{}/readyz", app.server.address)),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_ne!(body["checks"]["postgres"], "ok", "{body}");
    // Liveness is not readiness: the process itself is fine.
    let (status, _, _, _) = call(
        &client,
        client.get(format!("{}/healthz", app.server.address)),
    )
    .await;
    assert_eq!(status, 200);

    app.proxy.restore();
    until_200(&client, credits).await;
    // The webhook refused during the outage is taken when Stripe retries.
    let (status, _, body, _) = call(&client, webhook()).await;
    assert_eq!(status, 200, "{body}");
}

/// `slate serve` started while PostgreSQL refuses connections starts
/// anyway, as it runs on through an outage: alive, not ready, and ready by
/// itself once the database is back. (It used to exit, which left a
/// deployment with no server until its supervisor's next restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_while_postgres_is_down_starts_unready_and_gets_ready() {
    let (db, key) = db_with_a_key().await;
    let (proxy, url) = Proxy::in_front_of(&db.url).await;
    proxy.cut();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let serve = std::process::Command::new(env!("CARGO_BIN_EXE_slate"))
        .arg("serve")
        .env("DATABASE_URL", &url)
        .env("SLATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start slate serve");
    let mut serve = crate::harness::Process(serve);
    let address = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    crate::harness::until_serving(&address, || serve.0.try_wait().unwrap().is_none()).await;
    let (status, _, body, _) = call(&client, client.get(format!("{address}/readyz"))).await;
    assert_eq!(status, 503, "{body}");
    let credits = || {
        client
            .get(format!("{address}/v1/credits"))
            .bearer_auth(&key)
    };
    let (status, _, body, _) = call(&client, credits()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable", "{body}");

    proxy.restore();
    until_200(&client, || client.get(format!("{address}/readyz"))).await;
    let (status, _, body, _) = call(&client, credits()).await;
    assert_eq!(status, 200, "{body}");
    assert!(serve.0.try_wait().unwrap().is_none(), "serve exited");
}
