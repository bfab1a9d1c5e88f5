//! The staff console in headless Chromium, driven over WebDriver
//! (chromedriver) from the test: sign in as staff through the local OIDC
//! issuer and the second factor, search an account, open an audit entry,
//! see its related events. A screenshot is kept as a test artefact.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, Request, Respond, ResponseTemplate};

const CLIENT_ID: &str = "slate-console-test";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

use crate::harness::Process as Kill;

/// The issuer's authorize endpoint: remembers the nonce, sends the browser
/// back with a code.
struct Authorize(Arc<Mutex<Option<String>>>);
impl Respond for Authorize {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let q: std::collections::HashMap<_, _> = req.url.query_pairs().into_owned().collect();
        *self.0.lock().unwrap() = q.get("nonce").cloned();
        let location = format!(
            "{}?code=browser-code&state={}",
            q["redirect_uri"], q["state"]
        );
        ResponseTemplate::new(302).insert_header("location", location.as_str())
    }
}

/// The token endpoint: an ID token for the staff member, with that nonce.
struct Token {
    nonce: Arc<Mutex<Option<String>>>,
    issuer: String,
    email: String,
}
impl Respond for Token {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": self.issuer, "aud": CLIENT_ID, "sub": "staff-sub", "email": self.email,
            "email_verified": true, "nonce": self.nonce.lock().unwrap().clone(), "iat": now, "exp": now + 600,
        });
        let pem = std::fs::read(format!(
            "{}/tests/fixtures/oidc/issuer.pem",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("test-key-1".into());
        let token = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
        )
        .unwrap();
        ResponseTemplate::new(200)
            .set_body_json(json!({"access_token": "a", "token_type": "Bearer", "id_token": token}))
    }
}

struct Driver {
    http: reqwest::Client,
    base: String,
    session: String,
}

impl Driver {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(
            method,
            format!("{}/session/{}{path}", self.base, self.session),
        );
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        assert!(v["value"].get("error").is_none(), "webdriver {path}: {v}");
        v["value"].clone()
    }
    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }
    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }
    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_owned()
    }
    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }
    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn staff_sign_in_search_an_account_and_follow_an_entry_in_headless_chromium() {
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: scripts/test installs chromium and chromium-driver"
        );
    }
    // The local issuer.
    let issuer = crate::sessions::issuer().await;
    let uri = issuer.uri();
    let nonce = Arc::new(Mutex::new(None));
    Mock::given(method("GET"))
        .and(path("/authorize"))
        .respond_with(Authorize(nonce.clone()))
        .mount(&issuer)
        .await;
    let staff_email = format!(
        "ops-{}@example.com",
        &Uuid::new_v4().simple().to_string()[..6]
    );
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(Token {
            nonce,
            issuer: uri.clone(),
            email: staff_email.clone(),
        })
        .mount(&issuer)
        .await;

    // The app, with its redirect URL on its real port.
    let db = crate::harness::TestDb::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_url = format!("http://{}", listener.local_addr().unwrap());
    let env = [
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", crate::harness::redis_url()),
        ("SLATE_OIDC_ISSUER", uri.clone()),
        ("SLATE_OIDC_CLIENT_ID", CLIENT_ID.to_owned()),
        ("SLATE_OIDC_CLIENT_SECRET", "s".to_owned()),
        (
            "SLATE_OIDC_REDIRECT_URL",
            format!("{app_url}/v1/auth/oidc/callback"),
        ),
        ("SLATE_SECURE_COOKIES", "false".to_owned()),
    ];
    let config = slate::config::Config::from_lookup(|k| {
        env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap();
    let sealing = config.sealing_key.clone();
    let state = slate::http::AppState::new(config, db.pool.clone()).unwrap();
    tokio::spawn(slate::server::serve(
        listener,
        state,
        std::future::pending(),
    ));

    // A staff member with a second factor, and a customer with history.
    let mut conn = db.conn().await;
    let staff = slate_events::accounts::create_account(
        &mut conn,
        &staff_email,
        true,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    let uri_totp = slate_events::mfa::enroll(
        &mut conn,
        staff,
        &staff_email,
        &sealing,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    let customer = crate::credits::new_account(&mut conn).await;
    crate::credits::grant(
        &mut conn,
        customer,
        25,
        slate_events::catalog::GrantSource::Purchase,
        None,
    )
    .await;
    let (g, _) = crate::credits::reserve(&mut conn, customer, 5).await;
    slate_events::credits::release(
        &mut conn,
        g,
        "provider_failed",
        &slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    drop(conn);
    db.settle_projections().await;
    let customer_email: String =
        sqlx::query_scalar("select email from accounts where account_id = $1")
            .bind(customer)
            .fetch_one(&db.pool)
            .await
            .unwrap();

    // Chromium through chromedriver.
    let port = free_port();
    let _driver_process = Kill(
        Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/status")).send().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let profile = std::env::temp_dir().join(format!("slate-chromium-{}", Uuid::new_v4()));
    let created: Value = http
        .post(format!("{base}/session"))
        .json(&json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.display())],
        }}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let session = created["value"]["sessionId"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"))
        .to_owned();
    let d = Driver {
        http: http.clone(),
        base: base.clone(),
        session,
    };

    // Sign in: the issuer sends the browser back with a code; the console
    // then asks for the second factor.
    d.go(&format!("{app_url}/v1/auth/oidc/start")).await;
    assert!(
        d.source().await.contains("session_id"),
        "{}",
        d.source().await
    );
    d.go(&format!("{app_url}/admin")).await;
    assert!(d.source().await.contains("Authenticator code"));
    let secret_b32 = uri_totp
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let secret = crate::sessions::base32_decode(secret_b32);
    let code = crate::sessions::totp(&secret, chrono::Utc::now().timestamp());
    d.type_into("input[name=code]", &format!("{code}\u{E007}"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        d.source()
            .await
            .contains("Account id, email, request id or Stripe id"),
        "{}",
        d.source().await
    );

    // Search the account, open it, open an audit entry.
    d.type_into("input[name=q]", &format!("{customer_email}\u{E007}"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.click(&format!("a[href='/admin/console/accounts/{customer}']"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let account_page = d.source().await;
    assert!(
        account_page.contains("credits.released") && account_page.contains("Ledger"),
        "{account_page}"
    );
    let entry: i64 = sqlx::query_scalar(
        "select seq from audit_entries where action = 'credits.released' and account_id = $1",
    )
    .bind(customer)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    d.click(&format!("a[href='/admin/console/audit/{entry}']"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let entry_page = d.source().await;
    assert!(
        entry_page.contains("Causing event") && entry_page.contains("CreditsReleased"),
        "{entry_page}"
    );
    assert!(
        entry_page.contains("credits.reserved"),
        "the related reservation is listed"
    );

    // The artefact.
    let png = d.call(reqwest::Method::GET, "/screenshot", None).await;
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("staff-console-entry.png"), &bytes).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"));
    let _ = http
        .delete(format!("{base}/session/{}", d.session))
        .send()
        .await;
    let _ = std::fs::remove_dir_all(&profile);
}
