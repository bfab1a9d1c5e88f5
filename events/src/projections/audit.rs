//! Asynchronous projection `audit_log`: every event becomes one entry —
//! when, who (and on whose behalf), what, to what, with what outcome — and
//! never a prompt, a body or a secret (events hold none).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::Table;
use crate::Error;
use crate::catalog::DomainEvent;
use crate::store::RecordedEvent;

pub const NAME: &str = "audit_log";

pub const TABLES: &[Table] = &[Table {
    name: "audit_entries",
    // seq is the apply order, not part of the log's content.
    columns: "position, event_id, at, actor_kind, actor_id, impersonator, action, account_id, targets, \
              outcome, request_id, reason, api_key_id, ip, user_agent",
}];

/// Every event type is audited.
pub const EVENT_TYPES: &[&str] = &[
    "AccountCreated",
    "CreditsGranted",
    "CreditsReserved",
    "CreditsCaptured",
    "CreditsReleased",
    "CreditsRevoked",
    "CreditsExpired",
    "StripeEventReceived",
    "StripeCustomerLinked",
    "SubscriptionStateChanged",
    "BillingStatusChanged",
    "CheckoutPaymentFailed",
    "ApiKeyCreated",
    "ApiKeyRevoked",
    "AffiliateCreated",
    "AccountReferred",
    "CommissionEarned",
    "CommissionClawedBack",
    "AffiliatePayoutRecorded",
    "GenerationRequested",
    "GenerationStarted",
    "GenerationSubmitted",
    "GenerationSucceeded",
    "GenerationFailed",
    "GenerationCancelRequested",
    "GenerationCanceled",
    "PromptRejected",
    "AuthenticationFailed",
    "AccessDenied",
    "StaffRead",
    "SessionStarted",
    "SessionEnded",
    "TotpEnrolled",
    "SessionMfaVerified",
    "ImpersonationStarted",
    "ImpersonationEnded",
    "ImpersonatedRequest",
    "StripeEventReplayed",
    "AccountDeletionRequested",
    "AccountRestored",
    "AccountPurgeStepCompleted",
    "AccountPurged",
    "EmailSent",
];

struct Entry {
    action: &'static str,
    account: Option<Uuid>,
    targets: Map<String, Value>,
    outcome: &'static str,
    reason: Option<String>,
}

fn entry(action: &'static str, account: Option<Uuid>, targets: Value) -> Entry {
    Entry {
        action,
        account,
        targets: targets.as_object().cloned().unwrap_or_default(),
        outcome: "ok",
        reason: None,
    }
}

fn describe(event: &DomainEvent) -> Entry {
    use DomainEvent as E;
    match event {
        E::AccountCreated(e) => entry("account.created", Some(e.account_id), json!({})),
        E::CreditsGranted(e) => entry(
            "credits.granted",
            Some(e.account_id),
            json!({"bucket": e.bucket_id, "stripe_object": e.stripe_object, "amount": e.amount}),
        ),
        E::CreditsReserved(e) => entry(
            "credits.reserved",
            Some(e.account_id),
            json!({"generation": e.generation_id, "amount": e.amount}),
        ),
        E::CreditsCaptured(e) => entry(
            "credits.captured",
            Some(e.account_id),
            json!({"generation": e.generation_id, "amount": e.amount}),
        ),
        E::CreditsReleased(e) => {
            let mut x = entry(
                "credits.released",
                Some(e.account_id),
                json!({"generation": e.generation_id, "amount": e.amount}),
            );
            x.reason = Some(e.reason.clone());
            x
        }
        E::CreditsRevoked(e) => entry(
            "credits.revoked",
            Some(e.account_id),
            json!({"bucket": e.bucket_id, "stripe_object": e.stripe_object, "amount": e.amount, "debt_added": e.debt_added}),
        ),
        E::CreditsExpired(e) => entry(
            "credits.expired",
            Some(e.account_id),
            json!({"bucket": e.bucket_id, "amount": e.amount}),
        ),
        E::StripeEventReceived(e) => entry(
            "stripe.event_received",
            None,
            json!({"stripe_event": e.stripe_event_id, "stripe_type": e.stripe_event_type, "source": e.source}),
        ),
        E::StripeCustomerLinked(e) => entry(
            "stripe.customer_linked",
            Some(e.account_id),
            json!({"stripe_customer": e.customer_id}),
        ),
        E::SubscriptionStateChanged(e) => entry(
            "stripe.subscription_changed",
            Some(e.account_id),
            json!({"stripe_subscription": e.subscription_id, "status": e.status}),
        ),
        E::BillingStatusChanged(e) => entry(
            "billing.status_changed",
            Some(e.account_id),
            json!({"stripe_invoice": e.invoice_id, "past_due": e.past_due}),
        ),
        E::CheckoutPaymentFailed(e) => {
            let mut x = entry(
                "stripe.checkout_payment_failed",
                Some(e.account_id),
                json!({"stripe_checkout": e.checkout_session_id}),
            );
            x.outcome = "failed";
            x
        }
        E::ApiKeyCreated(e) => entry(
            "key.created",
            Some(e.account_id),
            json!({"key": e.key_id, "prefix": e.prefix}),
        ),
        E::ApiKeyRevoked(e) => entry("key.revoked", Some(e.account_id), json!({"key": e.key_id})),
        E::AffiliateCreated(e) => entry(
            "affiliate.created",
            None,
            json!({"affiliate": e.affiliate_id}),
        ),
        E::AccountReferred(e) => entry(
            "affiliate.referred",
            Some(e.account_id),
            json!({"affiliate": e.affiliate_id}),
        ),
        E::CommissionEarned(e) => entry(
            "affiliate.commission_earned",
            Some(e.account_id),
            json!({"affiliate": e.affiliate_id, "stripe_object": e.stripe_object, "amount": e.amount}),
        ),
        E::CommissionClawedBack(e) => entry(
            "affiliate.commission_clawed_back",
            Some(e.account_id),
            json!({"affiliate": e.affiliate_id, "stripe_object": e.stripe_object, "amount": e.amount}),
        ),
        E::AffiliatePayoutRecorded(e) => entry(
            "affiliate.payout_recorded",
            None,
            json!({"affiliate": e.affiliate_id, "amount": e.amount, "reference": e.reference}),
        ),
        E::GenerationRequested(e) => entry(
            "generation.requested",
            Some(e.account_id),
            json!({"generation": e.generation_id, "kind": e.kind, "provider": e.provider, "cost": e.cost}),
        ),
        E::GenerationStarted(e) => entry(
            "generation.started",
            Some(e.account_id),
            json!({"generation": e.generation_id, "attempt": e.attempt}),
        ),
        E::GenerationSubmitted(e) => entry(
            "generation.submitted",
            Some(e.account_id),
            json!({"generation": e.generation_id}),
        ),
        E::GenerationSucceeded(e) => entry(
            "generation.succeeded",
            Some(e.account_id),
            json!({"generation": e.generation_id}),
        ),
        E::GenerationFailed(e) => {
            let mut x = entry(
                "generation.failed",
                Some(e.account_id),
                json!({"generation": e.generation_id}),
            );
            x.outcome = "failed";
            x.reason = Some(e.reason_code.clone());
            x
        }
        E::GenerationCancelRequested(e) => entry(
            "generation.cancel_requested",
            Some(e.account_id),
            json!({"generation": e.generation_id}),
        ),
        E::GenerationCanceled(e) => {
            let mut x = entry(
                "generation.canceled",
                Some(e.account_id),
                json!({"generation": e.generation_id}),
            );
            x.reason = Some(e.reason.clone());
            x
        }
        E::PromptRejected(e) => {
            let mut x = entry(
                "generation.prompt_rejected",
                Some(e.account_id),
                json!({"category": e.category}),
            );
            x.outcome = "refused";
            x
        }
        E::AuthenticationFailed(e) => {
            let mut x = entry(
                "auth.failed",
                None,
                json!({"key_prefix": e.key_prefix, "route": e.route, "ip": e.ip}),
            );
            x.outcome = "refused";
            x.reason = Some(e.reason.clone());
            x
        }
        E::AccessDenied(e) => {
            let mut x = entry("auth.denied", Some(e.account_id), json!({"route": e.route}));
            x.outcome = "refused";
            x
        }
        E::StaffRead(e) => entry(
            "staff.read",
            Some(e.account_id),
            json!({"staff": e.staff_id, "what": e.what}),
        ),
        E::SessionStarted(e) => entry(
            "session.started",
            Some(e.account_id),
            json!({"session": e.session_id, "via": e.via}),
        ),
        E::SessionEnded(e) => {
            let mut x = entry(
                "session.ended",
                Some(e.account_id),
                json!({"session": e.session_id}),
            );
            x.reason = Some(e.reason.clone());
            x
        }
        E::TotpEnrolled(e) => entry("mfa.enrolled", Some(e.account_id), json!({})),
        E::SessionMfaVerified(e) => entry(
            "mfa.verified",
            Some(e.account_id),
            json!({"session": e.session_id}),
        ),
        E::ImpersonationStarted(e) => {
            let mut x = entry(
                "impersonation.started",
                Some(e.account_id),
                json!({"impersonation": e.impersonation_id, "staff": e.staff_id}),
            );
            x.reason = Some(e.reason.clone());
            x
        }
        E::ImpersonationEnded(e) => {
            let mut x = entry(
                "impersonation.ended",
                Some(e.account_id),
                json!({"impersonation": e.impersonation_id, "staff": e.staff_id}),
            );
            x.reason = Some(e.reason.clone());
            x
        }
        E::AccountDeletionRequested(e) => entry(
            "account.deletion_requested",
            Some(e.account_id),
            json!({"purge_after": e.purge_after}),
        ),
        E::AccountRestored(e) => entry("account.restored", Some(e.account_id), json!({})),
        E::AccountPurgeStepCompleted(e) => {
            let mut x = entry(
                "account.purge_step",
                Some(e.account_id),
                json!({"step": e.step}),
            );
            x.reason = Some(e.detail.clone());
            x
        }
        E::AccountPurged(e) => entry("account.purged", Some(e.account_id), json!({})),
        E::EmailSent(e) => entry(
            "email.sent",
            Some(e.account_id),
            json!({"template": e.template, "message": e.message_id}),
        ),
        E::StripeEventReplayed(e) => {
            let mut x = entry(
                "stripe.event_replayed",
                None,
                json!({"stripe_event": e.stripe_event_id, "staff": e.staff_id}),
            );
            x.reason = Some(e.outcome.clone());
            x
        }
        E::ImpersonatedRequest(e) => entry(
            "impersonation.request",
            Some(e.account_id),
            json!({"impersonation": e.impersonation_id, "staff": e.staff_id, "method": e.method, "route": e.route}),
        ),
    }
}

pub async fn apply(
    conn: &mut PgConnection,
    p: &str,
    recorded: &RecordedEvent,
    event: &DomainEvent,
) -> Result<(), Error> {
    apply_many(conn, p, &[(recorded, event.clone())]).await
}

/// One entry per event, in one INSERT (rebuilds and projector batches);
/// events past the retention cutoff are skipped (the events themselves stay).
pub async fn apply_many(
    conn: &mut PgConnection,
    p: &str,
    events: &[(&RecordedEvent, DomainEvent)],
) -> Result<(), Error> {
    let mut rows = Rows::default();
    for (recorded, event) in events {
        rows.push(recorded, event);
    }
    if rows.position.is_empty() {
        return Ok(());
    }
    sqlx::query(trusted_sql!(
        "insert into {p}audit_entries (position, event_id, at, actor_kind, actor_id, impersonator, action,
            account_id, targets, outcome, request_id, reason, api_key_id, ip, user_agent)
         select * from unnest($1::bigint[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[],
            $6::uuid[], $7::text[], $8::uuid[], $9::jsonb[], $10::text[], $11::text[], $12::text[],
            $13::uuid[], $14::text[], $15::text[]) as x(position, event_id, at)
         where x.at >= (select cutoff from audit_retention)"
    ))
    .bind(rows.position)
    .bind(rows.event_id)
    .bind(rows.at)
    .bind(rows.actor_kind)
    .bind(rows.actor_id)
    .bind(rows.impersonator)
    .bind(rows.action)
    .bind(rows.account)
    .bind(rows.targets)
    .bind(rows.outcome)
    .bind(rows.request_id)
    .bind(rows.reason)
    .bind(rows.api_key_id)
    .bind(rows.ip)
    .bind(rows.user_agent)
    .execute(conn)
    .await?;
    Ok(())
}

/// Entries as columns, for one `unnest` INSERT.
#[derive(Default)]
struct Rows {
    position: Vec<i64>,
    event_id: Vec<Uuid>,
    at: Vec<DateTime<Utc>>,
    actor_kind: Vec<String>,
    actor_id: Vec<Option<String>>,
    impersonator: Vec<Option<Uuid>>,
    action: Vec<&'static str>,
    account: Vec<Option<Uuid>>,
    targets: Vec<Value>,
    outcome: Vec<&'static str>,
    request_id: Vec<Option<String>>,
    reason: Vec<Option<String>>,
    api_key_id: Vec<Option<Uuid>>,
    ip: Vec<Option<String>>,
    user_agent: Vec<Option<String>>,
}

impl Rows {
    fn push(&mut self, recorded: &RecordedEvent, event: &DomainEvent) {
        let mut e = describe(event);
        let meta = &recorded.metadata;
        let text = |k: &str| meta.get(k).and_then(Value::as_str).map(str::to_owned);
        let actor = meta.get("actor").cloned().unwrap_or(Value::Null);
        if let Some(stripe_event) = meta.get("stripe_event_id").and_then(Value::as_str) {
            e.targets
                .entry("stripe_event")
                .or_insert_with(|| Value::String(stripe_event.to_owned()));
        }
        e.targets.retain(|_, v| !v.is_null());
        self.position.push(recorded.global_position);
        self.event_id.push(recorded.event_id);
        self.at.push(recorded.recorded_at);
        self.actor_kind.push(
            actor
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or("system")
                .to_owned(),
        );
        self.actor_id.push(
            actor
                .get("account_id")
                .or_else(|| actor.get("name"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        );
        self.impersonator
            .push(text("impersonator").and_then(|s| s.parse().ok()));
        self.action.push(e.action);
        self.account.push(e.account);
        self.targets.push(Value::Object(e.targets));
        self.outcome.push(e.outcome);
        self.request_id.push(text("request_id"));
        self.reason.push(e.reason);
        self.api_key_id
            .push(text("api_key_id").and_then(|s| s.parse().ok()));
        self.ip.push(text("ip"));
        self.user_agent.push(text("user_agent"));
    }
}

/// How long entries are kept.
pub const RETENTION_MONTHS: i32 = 18;

/// Drop entries older than 18 months before `now` (clock injected by
/// tests). Returns how many went.
pub async fn apply_retention(
    conn: &mut PgConnection,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<u64, Error> {
    let cutoff = now - chrono::Months::new(RETENTION_MONTHS as u32);
    sqlx::query("update audit_retention set cutoff = greatest(cutoff, $1)")
        .bind(cutoff)
        .execute(&mut *conn)
        .await?;
    let deleted =
        sqlx::query("delete from audit_entries where at < (select cutoff from audit_retention)")
            .execute(&mut *conn)
            .await?
            .rows_affected();
    Ok(deleted)
}
