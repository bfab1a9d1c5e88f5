//! Transactional email through an HTTP API shaped like Resend's
//! (`POST /emails` with a bearer key and an `Idempotency-Key`, answering
//! `{"id": …}`). Jobs carry the account id and the template, never the
//! address: it is read from `accounts` when the message goes out, so a
//! purged account gets nothing and no queue row holds an address.

use std::time::Duration;

use apalis::prelude::{Attempt, BoxDynError, Data, TaskId};
use serde::{Deserialize, Serialize};
use serde_json::json;
use slate_events::catalog::{DomainEvent, EmailSent};
use slate_events::store;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::jobs;

pub const QUEUE: &str = "slate.email";
pub const MAX_ATTEMPTS: usize = 8;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    DeletionScheduled,
    DeletionCompleted,
}

impl Template {
    pub fn as_str(self) -> &'static str {
        match self {
            Template::DeletionScheduled => "deletion_scheduled",
            Template::DeletionCompleted => "deletion_completed",
        }
    }

    fn render(self, purge_after: Option<chrono::DateTime<chrono::Utc>>) -> (String, String) {
        match self {
            Template::DeletionScheduled => (
                "Your Slate account is scheduled for deletion".into(),
                format!(
                    "You asked us to delete your Slate account. You can no longer sign in, and your \
                     API keys have stopped working.\n\nEverything will be erased on {}. Until then, \
                     write to support and we can restore the account.\n",
                    purge_after.map_or_else(
                        || "the scheduled date".into(),
                        |t| t.format("%Y-%m-%d").to_string()
                    )
                ),
            ),
            Template::DeletionCompleted => (
                "Your Slate account has been deleted".into(),
                "Your Slate account has been deleted: your media, prompts and profile are erased, \
                 and any subscription is canceled. Records we must keep for accounting hold no \
                 personal details.\n"
                    .into(),
            ),
        }
    }
}

#[derive(Clone)]
pub struct MailerSettings {
    /// e.g. `https://api.resend.com`.
    pub api_base: String,
    pub api_key: String,
    pub from: String,
}

impl std::fmt::Debug for MailerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailerSettings")
            .field("api_base", &self.api_base)
            .field("api_key", &"…")
            .field("from", &self.from)
            .finish()
    }
}

#[derive(Clone)]
pub struct Mailer {
    settings: MailerSettings,
    http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth another try later (network, 429, 5xx).
    #[error("the email API is unavailable: {0}")]
    Transient(String),
    /// The API refused the message; retrying will not help.
    #[error("the email API refused the message: HTTP {0}")]
    Refused(u16),
}

impl Mailer {
    pub fn new(settings: MailerSettings) -> anyhow::Result<Self> {
        Ok(Self {
            settings,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
        })
    }

    /// Send one message; the same `idempotency_key` never sends twice.
    /// Returns the API's message id.
    pub async fn send(
        &self,
        to: &str,
        subject: &str,
        text: &str,
        idempotency_key: &str,
    ) -> Result<String, SendError> {
        let url = format!("{}/emails", self.settings.api_base.trim_end_matches('/'));
        let response = self
            .http
            .post(url)
            .bearer_auth(&self.settings.api_key)
            .header("Idempotency-Key", idempotency_key)
            .json(&json!({
                "from": self.settings.from,
                "to": [to],
                "subject": subject,
                "text": text,
            }))
            .send()
            .await
            .map_err(|e| {
                SendError::Transient(if e.is_timeout() {
                    "timeout".into()
                } else {
                    "connection failed".into()
                })
            })?;
        let status = response.status();
        if status.is_success() {
            #[derive(Deserialize)]
            struct Sent {
                id: String,
            }
            let sent: Sent = response
                .json()
                .await
                .map_err(|_| SendError::Transient("unreadable answer".into()))?;
            return Ok(sent.id);
        }
        if status.as_u16() == 429 || status.is_server_error() {
            Err(SendError::Transient(format!("HTTP {}", status.as_u16())))
        } else {
            Err(SendError::Refused(status.as_u16()))
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EmailJob {
    pub account_id: Uuid,
    pub template: Template,
    /// Stable across retries: the email API's idempotency key.
    pub key: Uuid,
}

/// Enqueue a message in the caller's transaction ([`jobs::Wake::send`] after
/// it commits).
pub async fn enqueue(
    conn: &mut PgConnection,
    account_id: Uuid,
    template: Template,
) -> Result<jobs::Wake, apalis_postgres::Error> {
    let job = EmailJob {
        account_id,
        template,
        key: Uuid::now_v7(),
    };
    jobs::enqueue(conn, QUEUE, &job, MAX_ATTEMPTS).await
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Sent(String),
    /// No address any more (purged), or no email API configured.
    Skipped(&'static str),
}

/// Send `template` to the account's address now, and record it.
pub async fn deliver(
    pool: &PgPool,
    mailer: Option<&Mailer>,
    account_id: Uuid,
    template: Template,
    key: &str,
) -> anyhow::Result<Outcome> {
    let row: Option<(Option<String>, Option<chrono::DateTime<chrono::Utc>>)> =
        sqlx::query_as("select email, purge_after from accounts where account_id = $1")
            .bind(account_id)
            .fetch_optional(pool)
            .await?;
    let Some((Some(to), purge_after)) = row else {
        return Ok(Outcome::Skipped("the account has no address"));
    };
    let Some(mailer) = mailer else {
        tracing::warn!(%account_id, template = template.as_str(), "email not sent: no email API is configured");
        return Ok(Outcome::Skipped("no email API is configured"));
    };
    let (subject, text) = template.render(purge_after);
    let message_id = mailer.send(&to, &subject, &text, key).await?;
    let mut conn = pool.acquire().await?;
    store::record_once(
        &mut conn,
        account_id,
        &format!("email:{key}"),
        DomainEvent::EmailSent(EmailSent {
            account_id,
            template: template.as_str().into(),
            message_id: message_id.clone(),
        }),
    )
    .await?;
    tracing::info!(%account_id, template = template.as_str(), "email sent");
    Ok(Outcome::Sent(message_id))
}

#[derive(Clone)]
pub struct EmailWorker {
    pub pool: PgPool,
    pub mailer: Option<Mailer>,
}

#[tracing::instrument(level = "error", skip_all, fields(job_id = %task_id, account_id = %job.account_id, template = job.template.as_str(), attempt = attempt.current()))]
pub async fn handle(
    job: EmailJob,
    task_id: TaskId,
    attempt: Attempt,
    worker: Data<EmailWorker>,
) -> Result<(), BoxDynError> {
    jobs::contain(async move {
        let key = format!("{}-{}", job.template.as_str(), job.key);
        match deliver(
            &worker.pool,
            worker.mailer.as_ref(),
            job.account_id,
            job.template,
            &key,
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) => match e.downcast_ref::<SendError>() {
                Some(&SendError::Refused(status)) => {
                    tracing::error!(status, "email refused; not retried");
                    Err(Box::new(apalis::prelude::AbortError::new(SendError::Refused(status)))
                        as BoxDynError)
                }
                _ => {
                    let delay = jobs::backoff(attempt.current());
                    tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "email will be retried");
                    jobs::retry_later(&worker.pool, &task_id.to_string(), delay).await?;
                    Err(e.into())
                }
            },
        }
    })
    .await
}
