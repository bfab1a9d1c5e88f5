//! Completion webhooks, signed the Standard Webhooks way: `webhook-id`
//! (stable across retries), `webhook-timestamp`, and `webhook-signature` =
//! `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")) with the
//! account's `whsec_` secret. Delivered by the `slate.webhooks` job, retried
//! with backoff under the same id. URLs resolving to private, loopback or
//! link-local addresses are refused unless an allow-list names them.

use std::net::IpAddr;
use std::time::Duration;

use apalis::prelude::{Attempt, BoxDynError, Data, TaskId};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::jobs;

pub const QUEUE: &str = "slate.webhooks";
/// Deliveries tried at most, with [`retry_delay`]: about 13 hours in all
/// (plus up to a quarter of jitter), so that a receiver down for a deploy
/// or a night's outage still gets the notification. (It was 8 tries over
/// about 4 minutes.)
pub const MAX_ATTEMPTS: usize = 24;

/// The wait after delivery `n`: doubling from 2 s to an hour.
fn retry_delay(attempt: usize) -> Duration {
    jobs::backoff_up_to(attempt, 3600)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WebhookJob {
    pub generation_id: Uuid,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("the webhook URL is not an http(s) URL")]
    Invalid,
    #[error("the webhook URL's host does not resolve")]
    Unresolvable,
    #[error("the webhook URL resolves to a private, loopback or link-local address")]
    NotAllowed,
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                // Shared address space (carrier NAT), 100.64.0.0/10.
                || (o[0] == 100 && (64..128).contains(&o[1]))
                // IETF protocol assignments, 192.0.0.0/24.
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                // Benchmarking, 198.18.0.0/15.
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                // Reserved, 240.0.0.0/4.
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            // An IPv4 address inside an IPv6 one is judged as IPv4:
            // mapped (::ffff:a.b.c.d), compatible (::a.b.c.d), NAT64
            // (64:ff9b::/96) and 6to4 (2002::/16) reach it.
            let s = v6.segments();
            let v4 = |hi: u16, lo: u16| {
                let ([a, b], [c, d]) = (hi.to_be_bytes(), lo.to_be_bytes());
                std::net::Ipv4Addr::new(a, b, c, d)
            };
            let embedded = if s[0] == 0x2002 {
                Some(v4(s[1], s[2]))
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                Some(v4(s[6], s[7]))
            } else {
                v6.to_ipv4()
            };
            if let Some(inner) = embedded.filter(|_| !v6.is_loopback() && !v6.is_unspecified()) {
                return is_public(IpAddr::V4(inner));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Check a webhook URL: http(s), resolving only to public addresses unless
/// its host is on the allow-list.
pub async fn check_url(url: &str, allow: &[String]) -> Result<(), UrlError> {
    check_url_resolved(url, allow).await.map(drop)
}

/// [`check_url`], and the addresses its host resolved to (none on the
/// allow-list).
async fn check_url_resolved(
    url: &str,
    allow: &[String],
) -> Result<Vec<std::net::SocketAddr>, UrlError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| UrlError::Invalid)?;
    if !matches!(parsed.scheme(), "http" | "https") || url.len() > 2048 {
        return Err(UrlError::Invalid);
    }
    check_host(&parsed, allow).await
}

/// The client a request to `url` goes out with: one that connects to the
/// addresses [`check_host`] checked (`resolved`), not to what the name
/// answers when asked again (a short-lived answer could change in
/// between); `shared` for a host on the allow-list (nothing resolved).
pub fn pinned(
    shared: &reqwest::Client,
    builder: fn() -> reqwest::ClientBuilder,
    url: &reqwest::Url,
    resolved: &[std::net::SocketAddr],
) -> reqwest::Result<reqwest::Client> {
    match url.host_str() {
        Some(host) if !resolved.is_empty() => builder().resolve_to_addrs(host, resolved).build(),
        _ => Ok(shared.clone()),
    }
}

/// Whether `url`'s host (or host:port) is on the allow-list.
pub fn on_allow_list(url: &reqwest::Url, allow: &[String]) -> bool {
    let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
        return false;
    };
    allow
        .iter()
        .any(|a| a == host || *a == format!("{host}:{port}"))
}

/// An outbound URL's host resolves only to public addresses, or is on the
/// allow-list (webhooks; providers' result addresses). The addresses it
/// resolved to (none for a host on the allow-list), for the request to
/// connect to: a name asked again could answer otherwise.
pub async fn check_host(
    url: &reqwest::Url,
    allow: &[String],
) -> Result<Vec<std::net::SocketAddr>, UrlError> {
    let host = url.host_str().ok_or(UrlError::Invalid)?;
    let port = url.port_or_known_default().ok_or(UrlError::Invalid)?;
    if on_allow_list(url, allow) {
        return Ok(Vec::new());
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| UrlError::Unresolvable)?
        .collect();
    if addrs.is_empty() {
        return Err(UrlError::Unresolvable);
    }
    if addrs.iter().all(|a| is_public(a.ip())) {
        Ok(addrs)
    } else {
        Err(UrlError::NotAllowed)
    }
}

/// The account's signing secret, made on first use.
pub async fn secret_for(conn: &mut PgConnection, account_id: Uuid) -> Result<String, sqlx::Error> {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(&Uuid::new_v4().as_bytes()[..8]);
    let fresh = format!("whsec_{}", B64.encode(&bytes));
    let secret: Option<String> = sqlx::query_scalar(
        "with ins as (insert into webhook_secrets (account_id, secret) values ($1, $2)
                      on conflict (account_id) do nothing returning secret)
         select secret from ins union all select secret from webhook_secrets where account_id = $1 limit 1",
    )
    .bind(account_id)
    .bind(fresh)
    .fetch_optional(&mut *conn)
    .await?;
    match secret {
        Some(secret) => Ok(secret),
        // A concurrent first use inserted it after our snapshot (our insert
        // waited for its commit and did nothing): read it.
        None => {
            sqlx::query_scalar("select secret from webhook_secrets where account_id = $1")
                .bind(account_id)
                .fetch_one(conn)
                .await
        }
    }
}

/// `v1,<base64 signature>` of a message.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &str) -> Option<String> {
    let key = B64
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()?;
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).ok()?;
    mac.update(format!("{msg_id}.{timestamp}.{body}").as_bytes());
    Some(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// Enqueue the completion webhook of a generation that has one, in the
/// transaction that recorded its outcome ([`jobs::Wake::send`] after it).
pub async fn enqueue_for(
    conn: &mut PgConnection,
    generation_id: Uuid,
) -> Result<jobs::Wake, anyhow::Error> {
    let url: Option<String> =
        sqlx::query_scalar("select webhook_url from generation_inputs where generation_id = $1")
            .bind(generation_id)
            .fetch_optional(&mut *conn)
            .await?
            .flatten();
    enqueue_if(conn, generation_id, url.is_some()).await
}

/// [`enqueue_for`] when the caller has read the generation's webhook
/// address already (`wanted`: it has one).
pub async fn enqueue_if(
    conn: &mut PgConnection,
    generation_id: Uuid,
    wanted: bool,
) -> Result<jobs::Wake, anyhow::Error> {
    if !wanted {
        return Ok(jobs::Wake::none());
    }
    Ok(jobs::enqueue(conn, QUEUE, &WebhookJob { generation_id }, MAX_ATTEMPTS).await?)
}

#[derive(Clone)]
pub struct WebhookWorker {
    pub pool: PgPool,
    pub http: reqwest::Client,
    pub allow: Vec<String>,
}

impl WebhookWorker {
    pub fn new(pool: PgPool, allow: Vec<String>) -> anyhow::Result<Self> {
        Ok(Self {
            pool,
            http: webhook_client().build()?,
            allow,
        })
    }
}

/// No redirects, and no proxy from the environment (`HTTPS_PROXY` …): a
/// proxy resolves the host itself, past the checked addresses the request
/// is pinned to.
fn webhook_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// Nothing to deliver (no URL, or the generation is not finished).
    Nothing,
    /// Refused to send (the URL now resolves somewhere private).
    Refused,
    /// The receiver did not take it; retry under the same id.
    Retry(String),
}

/// One delivery attempt (tests call it directly).
pub async fn deliver(w: &WebhookWorker, generation_id: Uuid) -> anyhow::Result<Delivery> {
    let mut conn = w.pool.acquire().await?;
    let Some(g) = slate_events::generations::get_any(&mut conn, generation_id).await? else {
        return Ok(Delivery::Nothing);
    };
    if !g.is_terminal() {
        return Ok(Delivery::Nothing);
    }
    let url: Option<String> =
        sqlx::query_scalar("select webhook_url from generation_inputs where generation_id = $1")
            .bind(generation_id)
            .fetch_optional(&mut *conn)
            .await?
            .flatten();
    let Some(url) = url else {
        return Ok(Delivery::Nothing);
    };
    let secret = secret_for(&mut conn, g.account_id).await?;
    drop(conn);
    let resolved = match check_url_resolved(&url, &w.allow).await {
        Ok(resolved) => resolved,
        // A name that does not resolve now (the resolver failed, or the
        // receiver's DNS is down) may resolve later: it was checked at
        // submission. Refused, the notification was lost for good.
        Err(UrlError::Unresolvable) => {
            return Ok(Delivery::Retry("the webhook's host did not resolve".into()));
        }
        Err(UrlError::NotAllowed | UrlError::Invalid) => {
            tracing::warn!(%generation_id, "webhook not sent: its URL is not allowed");
            return Ok(Delivery::Refused);
        }
    };
    let http = match reqwest::Url::parse(&url) {
        Ok(parsed) => pinned(&w.http, webhook_client, &parsed, &resolved)?,
        Err(_) => return Ok(Delivery::Refused),
    };
    let body = json!({
        "type": format!("generation.{}", g.status),
        "timestamp": chrono::Utc::now(),
        "data": {
            "id": g.generation_id,
            "kind": g.kind,
            "provider": g.provider,
            "status": g.status,
            "cost": g.cost,
            "collection_id": g.collection_id,
            "failure_code": g.failure_code,
            "output": if g.status == "succeeded" {
                json!({
                    "content_type": g.output_content_type, "bytes": g.output_bytes,
                    "width": g.width, "height": g.height, "duration_ms": g.duration_ms,
                })
            } else {
                Value::Null
            },
        },
    })
    .to_string();
    let msg_id = format!("msg_{}", g.generation_id.simple());
    let timestamp = chrono::Utc::now().timestamp();
    let signature = sign(&secret, &msg_id, timestamp, &body)
        .ok_or_else(|| anyhow::anyhow!("the account's webhook secret is malformed"))?;
    let response = http
        .post(&url)
        .header("content-type", "application/json")
        .header("webhook-id", &msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    Ok(match response {
        Ok(r) if r.status().is_success() => Delivery::Delivered,
        Ok(r) => Delivery::Retry(format!("HTTP {}", r.status().as_u16())),
        Err(e) if e.is_timeout() => Delivery::Retry("timeout".into()),
        Err(_) => Delivery::Retry("connection failed".into()),
    })
}

#[tracing::instrument(level = "error", skip_all, fields(job_id = %task_id, generation_id = %job.generation_id, attempt = attempt.current()))]
pub async fn handle(
    job: WebhookJob,
    task_id: TaskId,
    attempt: Attempt,
    worker: Data<WebhookWorker>,
) -> Result<(), BoxDynError> {
    let delivery = deliver(&worker, job.generation_id).await.map_err(|e| {
        // apalis records the error on the job but logs nothing.
        tracing::warn!(error = %e, "completion webhook not attempted; the job runs again");
        e
    })?;
    match delivery {
        Delivery::Delivered => {
            tracing::info!("completion webhook delivered");
            Ok(())
        }
        Delivery::Nothing | Delivery::Refused => Ok(()),
        Delivery::Retry(reason) => {
            let delay = retry_delay(attempt.current());
            tracing::warn!(%reason, retry_in_s = delay.as_secs(), "completion webhook will be retried");
            jobs::retry_later(&worker.pool, &task_id.to_string(), delay).await?;
            Err(reason.into())
        }
    }
}

#[cfg(test)]
mod address_tests {
    use super::is_public;

    #[test]
    fn private_and_reserved_addresses_are_not_public_however_written() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "100.64.0.1",
            "192.0.0.8",
            "198.18.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }
}

#[cfg(test)]
mod retry_tests {
    use super::{MAX_ATTEMPTS, retry_delay};

    /// A receiver out of reach for half a day still gets its notification,
    /// and no two tries are more than an hour and a quarter apart.
    #[test]
    fn deliveries_are_retried_for_about_half_a_day_at_most_an_hour_and_a_quarter_apart() {
        let waits: Vec<u64> = (1..MAX_ATTEMPTS)
            .map(|n| retry_delay(n).as_secs())
            .collect();
        assert!(waits.iter().all(|&w| (2..=4500).contains(&w)), "{waits:?}");
        let total: u64 = waits.iter().sum();
        assert!((12 * 3600..=17 * 3600).contains(&total), "{total} s");
    }
}
