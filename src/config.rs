//! Configuration, read once from the environment and validated at start.
//! Every default points at a local service, so a fresh checkout runs with
//! nothing set (see `scripts/services`).

use std::fmt;
use std::net::SocketAddr;

use anyhow::Context;
use slate_events::moderation::DenyList;
use slate_events::stripe::StripeCatalog;
use slate_workers::providers::{
    ApiKey, EndpointSettings, ProviderSettings, ark_chat, elevenlabs, fal, seedance, whisper,
};
use slate_workers::storage::StorageSettings;

/// A secret whose `Debug` and `Display` print nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
    /// Pretty on a terminal, JSON otherwise.
    Auto,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: Secret,
    pub database_max_connections: u32,
    pub redis_url: Secret,
    pub listen: SocketAddr,
    pub s3_endpoint: String,
    pub s3_bucket: String,
    pub s3_region: String,
    pub aws_access_key_id: String,
    pub aws_secret_access_key: Secret,
    pub stripe_webhook_secrets: Vec<Secret>,
    pub stripe_api_key: Option<Secret>,
    pub stripe_api_base: Option<String>,
    pub livemode: bool,
    pub log_format: LogFormat,
    /// Credits per Stripe price, for one-off packs and subscription plans.
    pub stripe_catalog: StripeCatalog,
    /// Where users come back to after Checkout or the billing portal.
    pub public_url: String,
    /// Worker liveness: a worker that misses `worker_missed_heartbeats`
    /// beats is declared dead and its jobs go back to the queue.
    pub worker_heartbeat: std::time::Duration,
    pub worker_missed_heartbeats: usize,
    /// How often the scheduled maintenance sweep runs (one job per slot).
    pub sweep_interval: std::time::Duration,
    /// How long finished jobs stay in the queue's table (the sweep deletes
    /// them hourly afterwards).
    pub job_retention: slate_workers::jobs::Retention,
    /// Test-only fault injection: `slate work` holds each Stripe event's
    /// transaction open this long before committing.
    pub fault_stripe_hold: Option<std::time::Duration>,
    /// Submissions per minute per account and per client IP.
    pub rate_limit_account: u32,
    pub rate_limit_ip: u32,
    /// The prompt deny-list (file at SLATE_DENYLIST_PATH, or the built-in one).
    pub denylist: DenyList,
    pub generation_attempts: usize,
    /// Generations one `slate work` runs at once, and the workers (each
    /// with its own fetch loop) that share them.
    pub generation_concurrency: usize,
    pub generation_fetchers: usize,
    /// Jobs one `slate work` runs at once on the Stripe, completion-webhook,
    /// email and purge queues.
    pub stripe_concurrency: usize,
    pub webhook_concurrency: usize,
    pub email_concurrency: usize,
    pub purge_concurrency: usize,
    /// Bytes the results fetched from providers may hold together in one
    /// worker process.
    pub result_memory: usize,
    /// How long a generation's credits stay reserved before the sweeper
    /// releases them (its job must have finished by then).
    pub generation_hold: std::time::Duration,
    pub provider_poll: std::time::Duration,
    pub providers: ProviderSettings,
    /// Hosts (or host:port) completion webhooks may reach although they
    /// resolve to private or loopback addresses (tests, internal receivers).
    pub webhook_allowlist: Vec<String>,
    /// Hosts (or host:port) providers' results may be fetched from although
    /// they resolve to private or loopback addresses or serve plain http (a
    /// local model server, tests).
    pub media_allowlist: Vec<String>,
    /// Browser sign-in (OpenID Connect); None when no client id is set.
    pub oidc: Option<crate::oidc::OidcSettings>,
    pub session_idle: std::time::Duration,
    pub session_absolute: std::time::Duration,
    /// Mark cookies Secure (on unless explicitly off for plain-HTTP dev).
    pub secure_cookies: bool,
    /// Seals stored secrets (TOTP). SLATE_SECRET_KEY: 64 hex characters;
    /// the default is a fixed local-development key.
    pub sealing_key: slate_events::mfa::SealingKey,
    /// Transactional email (an API shaped like Resend's); None when no key is set.
    pub email: Option<slate_workers::email::MailerSettings>,
    /// SLATE_DEBUG_BODIES: one route template whose JSON bodies are logged,
    /// scrubbed, at debug level (for debugging only).
    pub debug_bodies: Option<String>,
    /// SLATE_METRICS_TOKEN: when set, `/metrics` answers only a scraper that
    /// sends it as `Authorization: Bearer <token>`.
    pub metrics_token: Option<Secret>,
    /// SLATE_REQUEST_READ_SECS: how long a client has to send a request's
    /// headers (on a kept-alive connection: from the previous answer), and,
    /// from the server's first read of it, its whole body.
    pub request_read: std::time::Duration,
}

/// The documented defaults (README, `scripts/services`).
pub const DEFAULTS: &[(&str, &str)] = &[
    ("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/slate"),
    ("DATABASE_MAX_CONNECTIONS", "20"),
    ("REDIS_URL", "redis://127.0.0.1:6379"),
    ("SLATE_LISTEN", "127.0.0.1:8080"),
    ("S3_ENDPOINT", "http://127.0.0.1:9000"),
    ("S3_BUCKET", "slate-media"),
    ("S3_REGION", "us-east-1"),
    ("AWS_ACCESS_KEY_ID", "slate"),
    ("AWS_SECRET_ACCESS_KEY", "slate-local-secret"),
    ("STRIPE_WEBHOOK_SECRETS", ""),
    ("STRIPE_API_KEY", ""),
    ("STRIPE_API_BASE", ""),
    ("SLATE_LIVEMODE", "false"),
    ("STRIPE_PACKS", ""),
    ("STRIPE_PLANS", ""),
    ("SLATE_PUBLIC_URL", "http://127.0.0.1:8080"),
    ("SLATE_WORKER_HEARTBEAT_SECS", "5"),
    ("SLATE_WORKER_MISSED_HEARTBEATS", "3"),
    ("SLATE_SWEEP_INTERVAL_SECS", "30"),
    ("SLATE_JOB_RETENTION_DAYS", "7"),
    ("SLATE_DEAD_JOB_RETENTION_DAYS", "30"),
    ("SLATE_FAULT_STRIPE_HOLD_MS", ""),
    ("SLATE_RATE_LIMIT_ACCOUNT_PER_MIN", "120"),
    ("SLATE_RATE_LIMIT_IP_PER_MIN", "600"),
    ("SLATE_DENYLIST_PATH", ""),
    ("SLATE_GENERATION_ATTEMPTS", "5"),
    ("SLATE_GENERATION_CONCURRENCY", "8"),
    ("SLATE_GENERATION_FETCHERS", "4"),
    ("SLATE_STRIPE_CONCURRENCY", "8"),
    ("SLATE_WEBHOOK_CONCURRENCY", "8"),
    ("SLATE_EMAIL_CONCURRENCY", "8"),
    ("SLATE_PURGE_CONCURRENCY", "2"),
    ("SLATE_RESULT_MEMORY_MB", "1024"),
    ("SLATE_GENERATION_HOLD_SECS", "7200"),
    ("SLATE_PROVIDER_POLL_MS", "2000"),
    ("SLATE_LOCAL_PROVIDER", "true"),
    ("SLATE_WEBHOOK_ALLOWLIST", ""),
    ("SLATE_MEDIA_ALLOWLIST", ""),
    ("SLATE_OIDC_ISSUER", "https://accounts.google.com"),
    ("SLATE_OIDC_CLIENT_ID", ""),
    ("SLATE_OIDC_CLIENT_SECRET", ""),
    ("SLATE_OIDC_REDIRECT_URL", ""),
    ("SLATE_SESSION_IDLE_SECS", "1800"),
    ("SLATE_SESSION_ABSOLUTE_SECS", "43200"),
    ("SLATE_SECURE_COOKIES", "true"),
    ("SLATE_SECRET_KEY", ""),
    ("SLATE_DEBUG_BODIES", ""),
    ("SLATE_METRICS_TOKEN", ""),
    ("SLATE_REQUEST_READ_SECS", "75"),
    ("SLATE_EMAIL_API_KEY", ""),
    ("SLATE_EMAIL_API_BASE", "https://api.resend.com"),
    ("SLATE_EMAIL_FROM", "Slate <no-reply@slate.local>"),
    ("FAL_KEY", ""),
    ("FAL_BASE_URL", ""),
    ("FAL_MODELS", ""),
    ("ELEVENLABS_API_KEY", ""),
    ("ELEVENLABS_BASE_URL", ""),
    ("ELEVENLABS_MODELS", ""),
    ("ARK_API_KEY", ""),
    ("ARK_BASE_URL", ""),
    ("SEEDANCE_MODELS", ""),
    ("ARK_CHAT_MODELS", ""),
    ("WHISPER_BASE_URL", ""),
    ("WHISPER_API_KEY", ""),
    ("WHISPER_MODELS", ""),
    ("SLATE_LOG_FORMAT", "auto"),
];

/// The deny-list used when SLATE_DENYLIST_PATH is not set.
pub const BUILTIN_DENYLIST: &str = include_str!("../config/denylist.txt");

/// A comma-separated setting's items.
fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn days(n: u32) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(n) * 24 * 3600)
}

fn positive(value: &str, name: &str) -> anyhow::Result<u32> {
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|v| *v > 0)
        .with_context(|| format!("{name} must be a positive integer"))
}

/// A provider is enabled by its key; the base URL is overridable (tests
/// point it at a local fake).
fn endpoint(
    non_empty: &impl Fn(&str) -> Option<String>,
    key: &str,
    base: &str,
    default_base: &str,
    timeout: std::time::Duration,
) -> Option<EndpointSettings> {
    let key = non_empty(key)?;
    let base = non_empty(base).unwrap_or_else(|| default_base.to_owned());
    Some(EndpointSettings::new(base, Some(ApiKey::new(key)), timeout))
}

impl Config {
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let get = |key: &str| -> String {
            lookup(key).unwrap_or_else(|| {
                DEFAULTS
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| (*v).to_owned())
                    .unwrap_or_default()
            })
        };
        let non_empty = |key: &str| Some(get(key)).filter(|v| !v.trim().is_empty());
        let secrets: Vec<Secret> = get("STRIPE_WEBHOOK_SECRETS")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect();
        if let Some(bad) = secrets.iter().find(|s| !s.expose().starts_with("whsec_")) {
            let _ = bad;
            anyhow::bail!("STRIPE_WEBHOOK_SECRETS: every secret must start with whsec_");
        }
        let log_format = match get("SLATE_LOG_FORMAT").as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            "auto" | "" => LogFormat::Auto,
            other => {
                anyhow::bail!("SLATE_LOG_FORMAT: expected json, pretty or auto, got {other:?}")
            }
        };
        let livemode = match get("SLATE_LIVEMODE").as_str() {
            "true" | "1" => true,
            "false" | "0" | "" => false,
            other => anyhow::bail!("SLATE_LIVEMODE: expected true or false, got {other:?}"),
        };
        // The offline provider makes placeholder media: live customers
        // would pay credits for it.
        if livemode && matches!(get("SLATE_LOCAL_PROVIDER").as_str(), "true" | "1") {
            anyhow::bail!("SLATE_LOCAL_PROVIDER must be false with SLATE_LIVEMODE=true");
        }
        Ok(Self {
            database_url: Secret::new(get("DATABASE_URL")),
            // None would leave every connect waiting for a connection.
            database_max_connections: positive(
                &get("DATABASE_MAX_CONNECTIONS"),
                "DATABASE_MAX_CONNECTIONS",
            )?,
            redis_url: Secret::new(get("REDIS_URL")),
            listen: get("SLATE_LISTEN")
                .parse()
                .context("SLATE_LISTEN must be host:port")?,
            s3_endpoint: get("S3_ENDPOINT"),
            s3_bucket: get("S3_BUCKET"),
            s3_region: get("S3_REGION"),
            aws_access_key_id: get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key: Secret::new(get("AWS_SECRET_ACCESS_KEY")),
            stripe_webhook_secrets: secrets,
            stripe_api_key: non_empty("STRIPE_API_KEY").map(Secret::new),
            stripe_api_base: non_empty("STRIPE_API_BASE"),
            livemode,
            log_format,
            stripe_catalog: StripeCatalog {
                packs: StripeCatalog::parse_prices(&get("STRIPE_PACKS"))
                    .map_err(|e| anyhow::anyhow!("STRIPE_PACKS: {e}"))?,
                plans: StripeCatalog::parse_prices(&get("STRIPE_PLANS"))
                    .map_err(|e| anyhow::anyhow!("STRIPE_PLANS: {e}"))?,
            },
            public_url: get("SLATE_PUBLIC_URL").trim_end_matches('/').to_owned(),
            worker_heartbeat: std::time::Duration::from_secs(
                get("SLATE_WORKER_HEARTBEAT_SECS")
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .context("SLATE_WORKER_HEARTBEAT_SECS must be a positive number")?,
            ),
            sweep_interval: std::time::Duration::from_secs(
                positive(
                    &get("SLATE_SWEEP_INTERVAL_SECS"),
                    "SLATE_SWEEP_INTERVAL_SECS",
                )?
                .into(),
            ),
            job_retention: slate_workers::jobs::Retention {
                done: days(positive(
                    &get("SLATE_JOB_RETENTION_DAYS"),
                    "SLATE_JOB_RETENTION_DAYS",
                )?),
                dead: days(positive(
                    &get("SLATE_DEAD_JOB_RETENTION_DAYS"),
                    "SLATE_DEAD_JOB_RETENTION_DAYS",
                )?),
            },
            worker_missed_heartbeats: get("SLATE_WORKER_MISSED_HEARTBEATS")
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .context("SLATE_WORKER_MISSED_HEARTBEATS must be a positive number")?,
            rate_limit_account: positive(
                &get("SLATE_RATE_LIMIT_ACCOUNT_PER_MIN"),
                "SLATE_RATE_LIMIT_ACCOUNT_PER_MIN",
            )?,
            rate_limit_ip: positive(
                &get("SLATE_RATE_LIMIT_IP_PER_MIN"),
                "SLATE_RATE_LIMIT_IP_PER_MIN",
            )?,
            denylist: match non_empty("SLATE_DENYLIST_PATH") {
                Some(path) => DenyList::parse(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("SLATE_DENYLIST_PATH {path}"))?,
                )
                .map_err(|e| anyhow::anyhow!("SLATE_DENYLIST_PATH: {e}"))?,
                None => DenyList::parse(BUILTIN_DENYLIST).expect("the built-in deny-list parses"),
            },
            generation_attempts: positive(
                &get("SLATE_GENERATION_ATTEMPTS"),
                "SLATE_GENERATION_ATTEMPTS",
            )? as usize,
            generation_concurrency: positive(
                &get("SLATE_GENERATION_CONCURRENCY"),
                "SLATE_GENERATION_CONCURRENCY",
            )? as usize,
            generation_fetchers: positive(
                &get("SLATE_GENERATION_FETCHERS"),
                "SLATE_GENERATION_FETCHERS",
            )? as usize,
            stripe_concurrency: positive(
                &get("SLATE_STRIPE_CONCURRENCY"),
                "SLATE_STRIPE_CONCURRENCY",
            )? as usize,
            webhook_concurrency: positive(
                &get("SLATE_WEBHOOK_CONCURRENCY"),
                "SLATE_WEBHOOK_CONCURRENCY",
            )? as usize,
            email_concurrency: positive(&get("SLATE_EMAIL_CONCURRENCY"), "SLATE_EMAIL_CONCURRENCY")?
                as usize,
            purge_concurrency: positive(&get("SLATE_PURGE_CONCURRENCY"), "SLATE_PURGE_CONCURRENCY")?
                as usize,
            result_memory: (positive(&get("SLATE_RESULT_MEMORY_MB"), "SLATE_RESULT_MEMORY_MB")?
                as usize)
                .saturating_mul(1 << 20),
            generation_hold: std::time::Duration::from_secs(
                positive(
                    &get("SLATE_GENERATION_HOLD_SECS"),
                    "SLATE_GENERATION_HOLD_SECS",
                )?
                .into(),
            ),
            provider_poll: std::time::Duration::from_millis(
                positive(&get("SLATE_PROVIDER_POLL_MS"), "SLATE_PROVIDER_POLL_MS")?.into(),
            ),
            providers: ProviderSettings {
                fal: endpoint(
                    &non_empty,
                    "FAL_KEY",
                    "FAL_BASE_URL",
                    fal::BASE_URL,
                    fal::DEFAULT_TIMEOUT,
                )
                .map(|e| e.with_models(list(&get("FAL_MODELS")))),
                elevenlabs: endpoint(
                    &non_empty,
                    "ELEVENLABS_API_KEY",
                    "ELEVENLABS_BASE_URL",
                    elevenlabs::BASE_URL,
                    elevenlabs::DEFAULT_TIMEOUT,
                )
                .map(|e| e.with_models(list(&get("ELEVENLABS_MODELS")))),
                seedance: endpoint(
                    &non_empty,
                    "ARK_API_KEY",
                    "ARK_BASE_URL",
                    seedance::BASE_URL,
                    seedance::DEFAULT_TIMEOUT,
                )
                .map(|e| e.with_models(list(&get("SEEDANCE_MODELS")))),
                ark: endpoint(
                    &non_empty,
                    "ARK_API_KEY",
                    "ARK_BASE_URL",
                    ark_chat::BASE_URL,
                    ark_chat::DEFAULT_TIMEOUT,
                )
                .map(|e| e.with_models(list(&get("ARK_CHAT_MODELS")))),
                // A whisper.cpp server needs no key: the base URL alone enables it.
                whisper: non_empty("WHISPER_BASE_URL")
                    .or_else(|| non_empty("WHISPER_API_KEY").map(|_| whisper::BASE_URL.to_owned()))
                    .map(|base| {
                        EndpointSettings::new(
                            base,
                            non_empty("WHISPER_API_KEY").map(ApiKey::new),
                            whisper::DEFAULT_TIMEOUT,
                        )
                        .with_models(list(&get("WHISPER_MODELS")))
                    }),
                local: matches!(get("SLATE_LOCAL_PROVIDER").as_str(), "true" | "1"),
            },
            webhook_allowlist: list(&get("SLATE_WEBHOOK_ALLOWLIST")),
            media_allowlist: list(&get("SLATE_MEDIA_ALLOWLIST")),
            oidc: non_empty("SLATE_OIDC_CLIENT_ID").map(|client_id| crate::oidc::OidcSettings {
                issuer: get("SLATE_OIDC_ISSUER").trim_end_matches('/').to_owned(),
                client_id,
                client_secret: Secret::new(get("SLATE_OIDC_CLIENT_SECRET")),
                redirect_url: non_empty("SLATE_OIDC_REDIRECT_URL").unwrap_or_else(|| {
                    format!(
                        "{}/v1/auth/oidc/callback",
                        get("SLATE_PUBLIC_URL").trim_end_matches('/')
                    )
                }),
            }),
            request_read: std::time::Duration::from_secs(
                positive(&get("SLATE_REQUEST_READ_SECS"), "SLATE_REQUEST_READ_SECS")?.into(),
            ),
            session_idle: std::time::Duration::from_secs(
                positive(&get("SLATE_SESSION_IDLE_SECS"), "SLATE_SESSION_IDLE_SECS")?.into(),
            ),
            session_absolute: std::time::Duration::from_secs(
                positive(
                    &get("SLATE_SESSION_ABSOLUTE_SECS"),
                    "SLATE_SESSION_ABSOLUTE_SECS",
                )?
                .into(),
            ),
            secure_cookies: !matches!(get("SLATE_SECURE_COOKIES").as_str(), "false" | "0"),
            sealing_key: match non_empty("SLATE_SECRET_KEY") {
                Some(hex_key) => {
                    let mut key = [0u8; 32];
                    hex::decode_to_slice(hex_key.trim(), &mut key)
                        .context("SLATE_SECRET_KEY must be 64 hex characters")?;
                    slate_events::mfa::SealingKey::new(key)
                }
                // The development key is in the source: live data sealed
                // with it would be readable by anyone holding a backup.
                None if livemode => {
                    anyhow::bail!("SLATE_SECRET_KEY is required with SLATE_LIVEMODE=true")
                }
                None => slate_events::mfa::SealingKey::development(),
            },
            debug_bodies: non_empty("SLATE_DEBUG_BODIES"),
            metrics_token: non_empty("SLATE_METRICS_TOKEN").map(Secret::new),
            email: non_empty("SLATE_EMAIL_API_KEY").map(|api_key| {
                slate_workers::email::MailerSettings {
                    api_base: get("SLATE_EMAIL_API_BASE"),
                    api_key,
                    from: get("SLATE_EMAIL_FROM"),
                }
            }),
            fault_stripe_hold: non_empty("SLATE_FAULT_STRIPE_HOLD_MS")
                .map(|v| v.parse().map(std::time::Duration::from_millis))
                .transpose()
                .context("SLATE_FAULT_STRIPE_HOLD_MS must be milliseconds")?,
        })
    }

    pub fn storage(&self) -> StorageSettings {
        StorageSettings {
            endpoint: self.s3_endpoint.clone(),
            bucket: self.s3_bucket.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.aws_access_key_id.clone(),
            secret_access_key: self.aws_secret_access_key.expose().to_owned(),
        }
    }

    /// The Stripe API client, when a key is configured.
    pub fn stripe_client(&self) -> anyhow::Result<Option<stripe::Client>> {
        let Some(key) = &self.stripe_api_key else {
            return Ok(None);
        };
        let mut builder =
            stripe::ClientBuilder::new(key.expose()).timeout(std::time::Duration::from_secs(20));
        if let Some(base) = &self.stripe_api_base {
            builder = builder.url(base);
        }
        Ok(Some(builder.build().context("building the Stripe client")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_point_at_local_services() {
        let c = Config::from_lookup(|_| None).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(c.database_url.expose().contains("127.0.0.1:5432/slate"));
        assert!(c.stripe_webhook_secrets.is_empty());
        assert!(!c.livemode);
        assert_eq!(
            (
                c.stripe_concurrency,
                c.webhook_concurrency,
                c.email_concurrency,
                c.purge_concurrency
            ),
            (
                slate_workers::runtime::STRIPE_CONCURRENCY,
                slate_workers::runtime::WEBHOOK_CONCURRENCY,
                slate_workers::runtime::EMAIL_CONCURRENCY,
                slate_workers::runtime::PURGE_CONCURRENCY
            )
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_lookup(|k| match k {
            "STRIPE_WEBHOOK_SECRETS" => Some("whsec_one,whsec_two".to_owned()),
            "SLATE_EMAIL_API_KEY" => Some("re_email_secret".to_owned()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.stripe_webhook_secrets.len(), 2);
        assert!(c.email.is_some());
        let printed = format!("{c:?}");
        assert!(!printed.contains("whsec_one"));
        assert!(!printed.contains("slate-local-secret"));
        assert!(!printed.contains("re_email_secret"));
    }

    #[test]
    fn live_mode_needs_its_own_secret_key_and_no_offline_provider() {
        let live = |key: Option<&str>, local: &str| {
            Config::from_lookup(|k| match k {
                "SLATE_LIVEMODE" => Some("true".to_owned()),
                "SLATE_SECRET_KEY" => key.map(str::to_owned),
                "SLATE_LOCAL_PROVIDER" => Some(local.to_owned()),
                _ => None,
            })
        };
        let key = "ab".repeat(32);
        let refused = live(None, "false").unwrap_err();
        assert!(format!("{refused:#}").contains("SLATE_SECRET_KEY"));
        let refused = live(Some(&key), "true").unwrap_err();
        assert!(format!("{refused:#}").contains("SLATE_LOCAL_PROVIDER"));
        assert!(live(Some(&key), "false").unwrap().livemode);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Config::from_lookup(|k| (k == "SLATE_LIVEMODE").then(|| "maybe".into())).is_err());
        assert!(
            Config::from_lookup(|k| (k == "DATABASE_MAX_CONNECTIONS").then(|| "0".into())).is_err()
        );
        assert!(
            Config::from_lookup(|k| (k == "STRIPE_WEBHOOK_SECRETS").then(|| "nope".into()))
                .is_err()
        );
        for name in [
            "SLATE_STRIPE_CONCURRENCY",
            "SLATE_WEBHOOK_CONCURRENCY",
            "SLATE_EMAIL_CONCURRENCY",
            "SLATE_PURGE_CONCURRENCY",
        ] {
            for bad in ["0", "-1", "many"] {
                assert!(
                    Config::from_lookup(|k| (k == name).then(|| bad.into())).is_err(),
                    "{name}={bad}"
                );
            }
        }
    }
}
