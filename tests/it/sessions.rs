//! Browser sign-in through OpenID Connect against a local issuer (wiremock
//! with its own keys and JWKS), sessions, and sign-out everywhere.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::http::{TestApp, spawn_app_with};

const CLIENT_ID: &str = "slate-test-client";

fn key(name: &str) -> EncodingKey {
    let pem = std::fs::read(format!(
        "{}/tests/fixtures/oidc/{name}.pem",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    EncodingKey::from_ec_pem(&pem).unwrap()
}

fn id_token(signer: &str, claims: Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-key-1".into());
    jsonwebtoken::encode(&header, &claims, &key(signer)).unwrap()
}

pub async fn issuer() -> MockServer {
    let server = MockServer::start().await;
    let uri = server.uri();
    Mock::given(method("GET"))
        .and(path("/.well-known/openid-configuration"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "issuer": uri, "authorization_endpoint": format!("{uri}/authorize"),
            "token_endpoint": format!("{uri}/token"), "jwks_uri": format!("{uri}/jwks"),
            "id_token_signing_alg_values_supported": ["ES256"],
        })))
        .mount(&server)
        .await;
    let jwks: Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/tests/fixtures/oidc/jwks.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(jwks))
        .mount(&server)
        .await;
    server
}

async fn app_for(issuer: &MockServer) -> TestApp {
    spawn_app_with(&[
        ("SLATE_OIDC_ISSUER", &issuer.uri()),
        ("SLATE_OIDC_CLIENT_ID", CLIENT_ID),
        ("SLATE_OIDC_CLIENT_SECRET", "test-client-secret"),
    ])
    .await
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// `start`: the state cookie and the (state, nonce) in the redirect.
async fn begin(app: &TestApp) -> (String, String, String) {
    let r = no_redirects()
        .get(format!("{}/v1/auth/oidc/start", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 302);
    let location = reqwest::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let q: std::collections::HashMap<_, _> = location.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], CLIENT_ID);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    (q["state"].clone(), q["nonce"].clone(), cookie)
}

fn claims(issuer: &MockServer, email: &str, nonce: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "iss": issuer.uri(), "aud": CLIENT_ID, "sub": format!("sub-{email}"), "email": email,
        "email_verified": true, "nonce": nonce, "iat": now, "exp": now + 600,
    })
}

/// The issuer's token endpoint answers with this ID token (once).
async fn token_endpoint_returns(issuer: &MockServer, id_token: String) {
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "ya29.test", "token_type": "Bearer", "expires_in": 3599, "id_token": id_token,
        })))
        .up_to_n_times(1)
        .mount(issuer)
        .await;
}

async fn finish(app: &TestApp, state: &str, cookie: &str) -> (u16, Value, Option<String>) {
    let r = no_redirects()
        .get(format!(
            "{}/v1/auth/oidc/callback?code=test-code&state={state}",
            app.address
        ))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let session = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("slate_session="));
    (status, r.json().await.unwrap_or(Value::Null), session)
}

async fn sign_in(app: &TestApp, issuer: &MockServer, email: &str) -> String {
    let (state, nonce, cookie) = begin(app).await;
    token_endpoint_returns(issuer, id_token("issuer", claims(issuer, email, &nonce))).await;
    let (status, body, session) = finish(app, &state, &cookie).await;
    assert_eq!(status, 200, "{body}");
    let set = session.expect("a session cookie");
    for flag in ["HttpOnly", "Secure", "SameSite=Lax"] {
        assert!(set.contains(flag), "{set}");
    }
    set.split(';').next().unwrap().to_owned()
}

async fn credits_with_cookie(app: &TestApp, cookie: &str) -> u16 {
    app.client
        .get(format!("{}/v1/credits", app.address))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Makes a bad ID token for the issuer and the login's nonce.
type Forgery = Box<dyn Fn(&MockServer, &str) -> String>;

#[tokio::test]
async fn a_valid_id_token_signs_in_and_forgeries_do_not() {
    let issuer = issuer().await;
    let app = app_for(&issuer).await;
    let session = sign_in(&app, &issuer, "ada@example.com").await;
    assert_eq!(credits_with_cookie(&app, &session).await, 200);
    // A new session at every sign-in.
    let second = sign_in(&app, &issuer, "ada@example.com").await;
    assert_ne!(session, second);
    let accounts: i64 =
        sqlx::query_scalar("select count(*) from accounts where email = 'ada@example.com'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(accounts, 1);

    let cases: Vec<(&str, Forgery)> = vec![
        (
            "bad signature",
            Box::new(|i, n| id_token("attacker", claims(i, "eve@example.com", n))),
        ),
        (
            "wrong audience",
            Box::new(|i, n| {
                let mut c = claims(i, "eve@example.com", n);
                c["aud"] = "someone-else".into();
                id_token("issuer", c)
            }),
        ),
        (
            "expired",
            Box::new(|i, n| {
                let mut c = claims(i, "eve@example.com", n);
                c["exp"] = (chrono::Utc::now().timestamp() - 3600).into();
                id_token("issuer", c)
            }),
        ),
        (
            "wrong issuer",
            Box::new(|i, n| {
                let mut c = claims(i, "eve@example.com", n);
                c["iss"] = "https://evil.example.com".into();
                id_token("issuer", c)
            }),
        ),
        (
            "another login's nonce",
            Box::new(|i, _| id_token("issuer", claims(i, "eve@example.com", "not-this-nonce"))),
        ),
    ];
    for (what, make) in cases {
        let (state, nonce, cookie) = begin(&app).await;
        token_endpoint_returns(&issuer, make(&issuer, &nonce)).await;
        let (status, body, session) = finish(&app, &state, &cookie).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("id_token_invalid")),
            "{what}: {body}"
        );
        assert!(session.is_none(), "{what}");
    }

    // A replayed callback (same state and nonce again) does not sign in.
    let (state, nonce, cookie) = begin(&app).await;
    let token = id_token("issuer", claims(&issuer, "ada@example.com", &nonce));
    token_endpoint_returns(&issuer, token.clone()).await;
    assert_eq!(finish(&app, &state, &cookie).await.0, 200);
    token_endpoint_returns(&issuer, token).await;
    let (status, body, _) = finish(&app, &state, &cookie).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("sign_in_state_invalid"))
    );
    // A callback without the browser's state cookie is refused (CSRF).
    let (state, _, _) = begin(&app).await;
    assert_eq!(finish(&app, &state, "slate_oidc_state=other").await.0, 401);
    let eve: i64 =
        sqlx::query_scalar("select count(*) from accounts where email = 'eve@example.com'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(eve, 0);
}

#[tokio::test]
async fn sign_out_everywhere_ends_every_session_and_key_at_once_in_another_process_too() {
    let issuer = issuer().await;
    let app = app_for(&issuer).await;
    let laptop = sign_in(&app, &issuer, "grace@example.com").await;
    let phone = sign_in(&app, &issuer, "grace@example.com").await;
    let account: uuid::Uuid =
        sqlx::query_scalar("select account_id from accounts where email = 'grace@example.com'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    let key = slate_events::access::create_key(
        &mut *app.db.conn().await,
        account,
        None,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap()
    .plaintext;

    // A second web process on the same database.
    let other = app.another_process(&[]).await;
    let get = |base: String, header: (&'static str, String)| async move {
        reqwest::Client::new()
            .get(format!("{base}/v1/credits"))
            .header(header.0, header.1)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get(other.clone(), ("cookie", phone.clone())).await, 200);
    assert_eq!(
        get(other.clone(), ("authorization", format!("Bearer {key}"))).await,
        200
    );

    let (_, listed) = {
        let r = app
            .client
            .get(format!("{}/v1/sessions", app.address))
            .header("cookie", &laptop)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(listed["data"].as_array().unwrap().len(), 2);

    let r = app
        .client
        .post(format!("{}/v1/sessions/revoke-all", app.address))
        .header("cookie", &laptop)
        .json(&json!({"include_keys": true}))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (
            body["sessions_ended"].as_i64(),
            body["keys_revoked"].as_i64()
        ),
        (Some(2), Some(1))
    );
    for base in [app.address.clone(), other.clone()] {
        assert_eq!(get(base.clone(), ("cookie", laptop.clone())).await, 401);
        assert_eq!(get(base.clone(), ("cookie", phone.clone())).await, 401);
        assert_eq!(
            get(base.clone(), ("authorization", format!("Bearer {key}"))).await,
            401
        );
    }
}

/// A cookie name sent twice is read as no cookie at all. A page on a
/// sibling subdomain can set a cookie of the same name for this host
/// (`Domain=` the parent, a narrower `Path`, sent first): the first one
/// read signed the browser into the session that page chose, or finished
/// its own sign-in in the victim's browser. Now neither is read.
#[tokio::test]
async fn a_cookie_sent_twice_is_not_read() {
    let issuer = issuer().await;
    let app = app_for(&issuer).await;
    let victim = sign_in(&app, &issuer, "vic@example.com").await;
    let attacker = sign_in(&app, &issuer, "mallory@example.com").await;
    assert_eq!(credits_with_cookie(&app, &victim).await, 200);
    assert_eq!(
        credits_with_cookie(&app, &format!("{attacker}; {victim}")).await,
        401
    );
    // The attacker's sign-in, finished in the victim's browser that holds
    // a state of its own.
    let (state, nonce, tossed) = begin(&app).await;
    let (_, _, own) = begin(&app).await;
    token_endpoint_returns(
        &issuer,
        id_token("issuer", claims(&issuer, "mallory@example.com", &nonce)),
    )
    .await;
    let (status, body, session) = finish(&app, &state, &format!("{tossed}; {own}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("sign_in_state_invalid")),
        "{body}"
    );
    assert!(session.is_none());
}

#[tokio::test]
async fn an_idle_session_ends_and_an_unknown_cookie_is_refused() {
    let issuer = issuer().await;
    let app = app_for(&issuer).await;
    let cookie = sign_in(&app, &issuer, "lin@example.com").await;
    let token = cookie.split_once('=').unwrap().1.to_owned();
    let mut conn = app.db.conn().await;
    let idle = chrono::Duration::minutes(30);
    let now = chrono::Utc::now();
    assert!(
        slate_events::sessions::authenticate(
            &mut conn,
            &token,
            idle,
            now + chrono::Duration::minutes(29)
        )
        .await
        .unwrap()
        .is_some()
    );
    // 31 idle minutes after that use: ended.
    assert!(
        slate_events::sessions::authenticate(
            &mut conn,
            &token,
            idle,
            now + chrono::Duration::minutes(61)
        )
        .await
        .unwrap()
        .is_none()
    );
    assert_eq!(credits_with_cookie(&app, &cookie).await, 401);
    assert_eq!(credits_with_cookie(&app, "slate_session=0000").await, 401);
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("select token_hash from sessions")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(
        stored.iter().all(|h| h.len() == 32),
        "only hashes are stored"
    );
    let log: String = sqlx::query_scalar("select string_agg(payload::text, ' ') from events")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(!log.contains(&token), "the session token is not in the log");
}

pub fn base32_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for c in s.chars() {
        let v = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567".find(c).unwrap() as u32;
        buffer = (buffer << 5) | v;
        bits += 5;
        if bits >= 8 {
            out.push((buffer >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    out
}

/// RFC 6238, computed here.
pub fn totp(secret: &[u8], at: i64) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(secret).unwrap();
    mac.update(&(at / 30).to_be_bytes());
    let h = mac.finalize().into_bytes();
    let o = (h[19] & 0x0f) as usize;
    let n = ((h[o] as u32 & 0x7f) << 24)
        | ((h[o + 1] as u32) << 16)
        | ((h[o + 2] as u32) << 8)
        | h[o + 3] as u32;
    format!("{:06}", n % 1_000_000)
}

/// `POST /v1/auth/totp` with the session `cookie`: the status, the body and
/// whether a `Retry-After` came with it.
async fn post_totp(app: &TestApp, cookie: &str, code: &str) -> (u16, Value, bool) {
    let r = app
        .client
        .post(format!("{}/v1/auth/totp", app.address))
        .header("cookie", cookie)
        .json(&json!({"code": code}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").is_some();
    (status, r.json().await.unwrap_or(Value::Null), retry_after)
}

/// A staff account with the second factor enrolled: its id and the TOTP
/// secret (base32), as the otpauth URI gives it.
async fn enrolled_staff(app: &TestApp, email: &str) -> (uuid::Uuid, String) {
    let mut conn = app.db.conn().await;
    let account = slate_events::accounts::create_account(
        &mut conn,
        email,
        true,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    let key = slate::config::Config::from_lookup(|_| None)
        .unwrap()
        .sealing_key;
    let uri = slate_events::mfa::enroll(
        &mut conn,
        account,
        email,
        &key,
        slate_events::Metadata::system(),
    )
    .await
    .unwrap();
    let secret = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    (account, secret.to_owned())
}

#[tokio::test]
async fn staff_need_the_second_factor_in_the_browser_and_a_code_works_once() {
    let issuer = issuer().await;
    let app = app_for(&issuer).await;
    let (root, secret_b32) = enrolled_staff(&app, "root@example.com").await;
    let secret = base32_decode(&secret_b32);

    let cookie = sign_in(&app, &issuer, "root@example.com").await;
    let admin = |cookie: String| {
        let (client, url) = (
            app.client.clone(),
            format!("{}/admin/accounts/{root}", app.address),
        );
        async move {
            client
                .get(url)
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(
        admin(cookie.clone()).await,
        403,
        "no staff powers before the second factor"
    );
    // Nor a key, which would carry them without it.
    let issue_key = |cookie: String| {
        let (client, url) = (app.client.clone(), format!("{}/v1/keys", app.address));
        async move {
            let r = client
                .post(url)
                .header("cookie", cookie)
                .json(&json!({"label": "ci"}))
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = issue_key(cookie.clone()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("second_factor_required")),
        "{body}"
    );
    let keys: i64 = sqlx::query_scalar("select count(*) from api_keys where account_id = $1")
        .bind(root)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(keys, 0, "nothing issued");
    let (app_ref, cookie_ref) = (&app, &cookie);
    let post_code = move |code: String| async move {
        let (status, body, _) = post_totp(app_ref, cookie_ref, &code).await;
        (status, body)
    };
    let now = chrono::Utc::now().timestamp();
    let good = totp(&secret, now);
    let wrong = format!("{:06}", (good.parse::<u32>().unwrap() + 1) % 1_000_000);
    assert_eq!(post_code(wrong).await.0, 401);
    let (status, body) = post_code(good.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(admin(cookie.clone()).await, 200);
    let (status, body) = issue_key(cookie.clone()).await;
    assert_eq!(status, 201, "after the second factor: {body}");
    let (status, body) = post_code(good).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("totp_invalid")),
        "a code works once"
    );

    // The secret is stored sealed only, and never in the log.
    let everything: String = sqlx::query_scalar(
        "select coalesce((select string_agg(sealed, ' ') from totp_secrets), '')
             || coalesce((select string_agg(payload::text || metadata::text, ' ') from events), '')",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(!everything.contains(&secret_b32));
    assert!(!everything.contains(&hex::encode(&secret)));
}

/// A stolen first factor cannot try second-factor codes at speed: five
/// attempts an account per five minutes, then 429 `rate_limited` with
/// `Retry-After`, even for the right code.
#[tokio::test]
async fn second_factor_attempts_are_limited_per_account() {
    let issuer = issuer().await;
    let app = app_for(&issuer).await;
    let (_, secret_b32) = enrolled_staff(&app, "guarded@example.com").await;
    let secret = base32_decode(&secret_b32);
    let cookie = sign_in(&app, &issuer, "guarded@example.com").await;
    let (app_ref, cookie_ref) = (&app, &cookie);
    let post_code = move |code: String| async move {
        let (status, body, retry_after) = post_totp(app_ref, cookie_ref, &code).await;
        let code = body["error"]["code"].as_str().map(str::to_owned);
        (status, code, retry_after)
    };
    let good = totp(&secret, chrono::Utc::now().timestamp());
    let wrong = format!(
        "{:06}",
        (good.parse::<u32>().unwrap() + 500_000) % 1_000_000
    );
    for _ in 0..5 {
        let (status, code, _) = post_code(wrong.clone()).await;
        assert_eq!((status, code.as_deref()), (401, Some("totp_invalid")));
    }
    let (status, code, retry_after) = post_code(good).await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    assert!(retry_after, "429 says when to try again");
}

/// A request that changes something, made with the session cookie from
/// another site's page (a sibling subdomain gets the `SameSite=Lax` cookie
/// sent with a form's POST), is refused: `Sec-Fetch-Site` where the browser
/// sends it, `Origin` against `SLATE_PUBLIC_URL` otherwise. Reads, this
/// service's own pages and clients that are not browsers go on.
#[tokio::test]
async fn a_cross_site_request_cannot_use_the_session_to_change_anything() {
    let issuer = issuer().await;
    let app = app_for(&issuer).await;
    let cookie = sign_in(&app, &issuer, "browser@example.com").await;
    let issue = |headers: &'static [(&'static str, &'static str)]| {
        let mut req = app
            .client
            .post(format!("{}/v1/keys", app.address))
            .header("cookie", cookie.clone())
            .json(&json!({"label": "from a page"}));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.json::<Value>().await.unwrap_or(Value::Null);
            (status, body["error"]["code"].as_str().map(str::to_owned))
        }
    };
    let refused = (403, Some("cross_site_request".to_owned()));
    assert_eq!(issue(&[("sec-fetch-site", "cross-site")]).await, refused);
    assert_eq!(issue(&[("sec-fetch-site", "same-site")]).await, refused);
    assert_eq!(issue(&[("origin", "https://evil.example")]).await, refused);
    assert_eq!(
        issue(&[("origin", "http://127.0.0.1:8080.evil.example")]).await,
        refused
    );
    let keys: i64 = sqlx::query_scalar("select count(*) from api_keys")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(keys, 0, "nothing was issued");
    // This service's own pages (the default public URL), and a client
    // that is not a browser's page.
    assert_eq!(issue(&[("sec-fetch-site", "same-origin")]).await.0, 201);
    assert_eq!(issue(&[("origin", "http://127.0.0.1:8080")]).await.0, 201);
    assert_eq!(issue(&[]).await.0, 201);
    // A read from anywhere is only a read.
    let r = app
        .client
        .get(format!("{}/v1/keys", app.address))
        .header("cookie", cookie.clone())
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// The whole access story through a real `slate serve` process at trace
/// level, then the database dumped: no API key, session token or TOTP
/// secret appears in either, in plaintext.
#[tokio::test]
async fn no_plaintext_key_session_token_or_totp_secret_in_the_database_or_the_logs() {
    use std::process::{Command, Stdio};

    let issuer = issuer().await;
    let db = crate::harness::TestDb::new().await;
    let bin = env!("CARGO_BIN_EXE_slate");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let created = run(&[
        "accounts",
        "create",
        "--email",
        "boss@example.com",
        "--staff",
    ]);
    let first_key = created.lines().last().unwrap().trim().to_owned();
    let account = created
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("account ")
        .trim()
        .to_owned();
    let enrolled = run(&["accounts", "totp-enroll", "--account", &account]);
    let uri = enrolled.lines().last().unwrap().trim().to_owned();
    let secret_b32 = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned();
    let secret = base32_decode(&secret_b32);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path = std::env::temp_dir().join(format!("slate-access-{}.log", uuid::Uuid::new_v4()));
    let mut serve = Command::new(bin)
        .arg("serve")
        .env("DATABASE_URL", &db.url)
        .env("SLATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("SLATE_OIDC_ISSUER", issuer.uri())
        .env("SLATE_OIDC_CLIENT_ID", CLIENT_ID)
        .env("SLATE_OIDC_CLIENT_SECRET", "test-client-secret")
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let app = TestApp {
        address: format!("http://127.0.0.1:{port}"),
        db,
        client: reqwest::Client::new(),
    };
    crate::harness::until_serving(&app.address, || serve.try_wait().unwrap().is_none()).await;

    let session_cookie = sign_in(&app, &issuer, "boss@example.com").await;
    let session_token = session_cookie.split_once('=').unwrap().1.to_owned();
    let code = totp(&secret, chrono::Utc::now().timestamp());
    let r = app
        .client
        .post(format!("{}/v1/auth/totp", app.address))
        .header("cookie", &session_cookie)
        .json(&json!({"code": code}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (status, created) = app
        .post_json("/v1/keys", Some(&first_key), json!({"label": "second"}))
        .await;
    assert_eq!(status, 201);
    let second_key = created["key"].as_str().unwrap().to_owned();
    // A few refusals too (they are logged and recorded).
    let _ = app
        .get_as("/v1/credits", Some(&format!("{first_key}x")))
        .await;
    let _ = app
        .client
        .get(format!("{}/v1/credits", app.address))
        .header("cookie", "slate_session=deadbeef")
        .send()
        .await;

    let _ = serve.kill();
    let _ = serve.wait();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    let plain_url = app.db.url.split('?').next().unwrap().to_owned();
    let dump = Command::new("pg_dump")
        .arg("--data-only")
        .arg(&plain_url)
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains("boss@example.com"), "the dump has the data");
    let secrets = [
        ("first API key", first_key.clone()),
        ("first key's secret part", first_key[24..].to_owned()),
        ("second API key", second_key.clone()),
        ("session token", session_token),
        ("TOTP secret (base32)", secret_b32),
        ("TOTP secret (hex)", hex::encode(&secret)),
    ];
    for (what, secret) in &secrets {
        assert!(!dump.contains(secret.as_str()), "{what} is in the database");
        assert!(!logs.contains(secret.as_str()), "{what} is in the logs");
    }
    assert!(
        logs.contains("authentication failed"),
        "refusals are logged (without the secret)"
    );
}

/// A deleted account comes back when its owner signs in within the grace
/// period; after it, sign-in is refused with a stable code.
#[tokio::test]
async fn signing_in_within_thirty_days_of_deleting_restores_the_account() {
    let issuer = issuer().await;
    let app = app_for(&issuer).await;
    let session = sign_in(&app, &issuer, "grace@example.com").await;
    let r = app
        .client
        .delete(format!("{}/v1/account", app.address))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(credits_with_cookie(&app, &session).await, 401);

    let again = sign_in(&app, &issuer, "grace@example.com").await;
    assert_eq!(credits_with_cookie(&app, &again).await, 200, "restored");
    let (account, deleted): (uuid::Uuid, bool) = sqlx::query_as(
        "select account_id, deleted_at is not null from accounts where email = 'grace@example.com'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(!deleted);
    let restored_by: Value = sqlx::query_scalar(
        "select metadata->'actor' from events where event_type = 'AccountRestored' and payload->>'account_id' = $1",
    )
    .bind(account.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(
        restored_by["account_id"],
        account.to_string(),
        "{restored_by}"
    );
    // The deletion's renewal job and the restore's, which makes the
    // subscriptions the deletion stopped renew again.
    let renewal_jobs: i64 = sqlx::query_scalar(
        "select count(*) from apalis.jobs where job_type = 'slate.renewal'
            and convert_from(job, 'UTF8')::jsonb->>'account_id' = $1",
    )
    .bind(account.to_string())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(renewal_jobs, 2);

    // Deleted again, and the grace period is over (purge not yet run).
    crate::access::delete_committed(
        &app.db.pool,
        account,
        chrono::Utc::now() - chrono::Duration::days(31),
    )
    .await;
    let (state, nonce, cookie) = begin(&app).await;
    token_endpoint_returns(
        &issuer,
        id_token("issuer", claims(&issuer, "grace@example.com", &nonce)),
    )
    .await;
    let (status, body, session) = finish(&app, &state, &cookie).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("account_deleted")),
        "{body}"
    );
    assert!(session.is_none());
}
