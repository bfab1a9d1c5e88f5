//! Browser sign-in through OpenID Connect (Google in production; tests run
//! a local issuer with its own keys and JWKS). Authorization-code flow with
//! a one-time state (CSRF, bound to the browser by a cookie) and nonce; the
//! ID token's signature (JWKS), issuer, audience, expiry and nonce are all
//! checked before a session starts.

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use slate_events::{Actor, Metadata};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::{Config, Secret};

#[derive(Debug, Clone)]
pub struct OidcSettings {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("sign-in is not configured")]
    NotConfigured,
    #[error("the sign-in state is unknown, used or expired")]
    BadState,
    #[error("the identity provider could not be reached")]
    Provider,
    #[error("the ID token was refused")]
    BadToken,
    #[error("the account's email is not verified by the identity provider")]
    EmailNotVerified,
    #[error("the account is deleted and its grace period is over")]
    AccountDeleted,
    #[error(transparent)]
    Store(#[from] slate_events::Error),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("enqueueing a job: {0}")]
    Queue(anyhow::Error),
}

#[derive(Debug, Deserialize)]
struct Discovery {
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    id_token: String,
}

#[derive(Debug, Deserialize)]
struct Claims {
    email: Option<String>,
    #[serde(default)]
    email_verified: Option<serde_json::Value>,
    nonce: Option<String>,
}

fn sha256(s: &str) -> Vec<u8> {
    Sha256::digest(s.as_bytes()).to_vec()
}

/// `application/x-www-form-urlencoded`.
fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |v: &str| {
        v.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a plain client builds")
}

async fn discover(issuer: &str) -> Result<Discovery, SignInError> {
    http()
        .get(format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|_| SignInError::Provider)?
        .json()
        .await
        .map_err(|_| SignInError::Provider)
}

pub struct Started {
    pub redirect_to: String,
    pub state: String,
}

/// Begin a sign-in: the URL to send the browser to, and the state to bind
/// to it (cookie).
pub async fn start(pool: &PgPool, s: &OidcSettings) -> Result<Started, SignInError> {
    let d = discover(&s.issuer).await?;
    let state = slate_events::sessions::random_token();
    let nonce = slate_events::sessions::random_token();
    sqlx::query("insert into oidc_logins (state, nonce_hash) values ($1, $2)")
        .bind(&state)
        .bind(sha256(&nonce))
        .execute(pool)
        .await?;
    let mut url =
        reqwest::Url::parse(&d.authorization_endpoint).map_err(|_| SignInError::Provider)?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &s.client_id)
        .append_pair("redirect_uri", &s.redirect_url)
        .append_pair("scope", "openid email")
        .append_pair("state", &state)
        .append_pair("nonce", &nonce);
    Ok(Started {
        redirect_to: url.to_string(),
        state,
    })
}

pub struct SignedIn {
    pub account_id: Uuid,
    pub session: slate_events::sessions::NewSession,
}

/// Finish a sign-in: consume the state (once), exchange the code, verify
/// the ID token, find or open the account, start a new session.
pub async fn finish(
    pool: &PgPool,
    config: &Config,
    s: &OidcSettings,
    state: &str,
    browser_state: Option<&str>,
    code: &str,
) -> Result<SignedIn, SignInError> {
    if browser_state != Some(state) {
        return Err(SignInError::BadState);
    }
    let nonce_hash: Option<Vec<u8>> = sqlx::query_scalar(
        "update oidc_logins set used_at = now()
          where state = $1 and used_at is null and created_at > now() - interval '10 minutes'
          returning nonce_hash",
    )
    .bind(state)
    .fetch_optional(pool)
    .await?;
    let nonce_hash = nonce_hash.ok_or(SignInError::BadState)?;

    let d = discover(&s.issuer).await?;
    let token: TokenResponse = http()
        .post(&d.token_endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", s.redirect_url.as_str()),
            ("client_id", s.client_id.as_str()),
            ("client_secret", s.client_secret.expose()),
        ]))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|_| SignInError::Provider)?
        .json()
        .await
        .map_err(|_| SignInError::Provider)?;
    let jwks: JwkSet = http()
        .get(&d.jwks_uri)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|_| SignInError::Provider)?
        .json()
        .await
        .map_err(|_| SignInError::Provider)?;

    let header = jsonwebtoken::decode_header(&token.id_token).map_err(|_| SignInError::BadToken)?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Err(SignInError::BadToken);
    }
    let jwk = header
        .kid
        .as_deref()
        .and_then(|kid| jwks.find(kid))
        .ok_or(SignInError::BadToken)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| SignInError::BadToken)?;
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[&s.client_id]);
    validation.set_issuer(&[&s.issuer]);
    validation.leeway = 60;
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<Claims>(&token.id_token, &key, &validation)
        .map_err(|_| SignInError::BadToken)?
        .claims;
    let nonce = claims.nonce.ok_or(SignInError::BadToken)?;
    if sha256(&nonce) != nonce_hash {
        return Err(SignInError::BadToken);
    }
    let verified = matches!(claims.email_verified, Some(serde_json::Value::Bool(true)))
        || claims.email_verified.as_ref().and_then(|v| v.as_str()) == Some("true");
    let email = claims
        .email
        .filter(|_| verified)
        .ok_or(SignInError::EmailNotVerified)?;

    let mut conn = pool.acquire().await?;
    let existing: Option<(Uuid, bool)> = sqlx::query_as(
        "select account_id, deleted_at is not null from accounts where lower(email) = lower($1)",
    )
    .bind(&email)
    .fetch_optional(&mut *conn)
    .await?;
    let account_id = match existing {
        Some((a, false)) => a,
        // Signing in within the grace period undoes the deletion, and
        // the subscriptions it stopped renew again.
        Some((a, true)) => {
            let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
            match slate_events::accounts::restore(
                &mut tx,
                a,
                chrono::Utc::now(),
                Metadata::by(Actor::User { account_id: a }),
            )
            .await?
            {
                slate_events::accounts::Restore::Restored => {}
                _ => return Err(SignInError::AccountDeleted),
            }
            let renewal = slate_workers::renewal::enqueue(&mut tx, a)
                .await
                .map_err(|e| SignInError::Queue(e.into()))?;
            tx.commit().await?;
            renewal.send(pool).await;
            a
        }
        None => {
            slate_events::accounts::create_account(
                &mut conn,
                &email,
                false,
                Metadata::by(Actor::System),
            )
            .await?
        }
    };
    let session = slate_events::sessions::start(
        &mut conn,
        account_id,
        "oidc",
        chrono::Duration::from_std(config.session_absolute).unwrap_or(chrono::Duration::hours(12)),
        Metadata::by(Actor::User { account_id }),
    )
    .await?;
    Ok(SignedIn {
        account_id,
        session,
    })
}
