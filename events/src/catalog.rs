//! The event catalog: every event is a Rust type with a name and a schema
//! version. Payloads written by older code are upcast on read, so the rest of
//! the system only ever sees the current shape. `slate events schema` exports
//! the catalog as JSON Schema files under `events/schema/`.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::Error;

/// Who did it. Stored in every event's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Actor {
    System,
    /// An operator at the command line (`slate credits grant` …).
    Operator {
        name: String,
    },
    User {
        account_id: Uuid,
    },
    Staff {
        account_id: Uuid,
    },
    Stripe,
}

/// Event metadata: who, on whose behalf, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Metadata {
    pub actor: Actor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonator: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The Stripe event that caused this one, for Stripe effects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_event_id: Option<String>,
    /// The API key the request came with (its id, never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<Uuid>,
    /// The client's address and user agent, for requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

impl Metadata {
    pub fn system() -> Self {
        Self::by(Actor::System)
    }

    pub fn by(actor: Actor) -> Self {
        Self {
            actor,
            impersonator: None,
            request_id: None,
            causation_id: None,
            correlation_id: None,
            stripe_event_id: None,
            api_key_id: None,
            ip: None,
            user_agent: None,
        }
    }

    /// An effect of processing a Stripe event: actor Stripe, caused by the
    /// `StripeEventReceived` of that event.
    pub fn stripe_effect(stripe_event_id: &str) -> Self {
        Self {
            causation_id: Some(stripe_received_event_id(stripe_event_id)),
            stripe_event_id: Some(stripe_event_id.to_owned()),
            ..Self::by(Actor::Stripe)
        }
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("metadata serializes")
    }
}

/// A typed event with a stable name and a schema version.
pub trait EventType: Serialize + DeserializeOwned + JsonSchema {
    const NAME: &'static str;
    const VERSION: i16;
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

macro_rules! event_type {
    ($ty:ty, $name:literal, $version:literal) => {
        impl EventType for $ty {
            const NAME: &'static str = $name;
            const VERSION: i16 = $version;
        }
    };
}

/// An account was opened (v2: carries the staff role).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountCreated {
    pub account_id: Uuid,
    /// Sealed with the account's data key (`sealed:v1:…`, see `vault`);
    /// unreadable once the account is purged. Older events hold it plain.
    pub email: String,
    pub staff: bool,
}
event_type!(AccountCreated, "AccountCreated", 2);

/// Where a grant's credits came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrantSource {
    Purchase,
    Subscription,
    Promotion,
    Goodwill,
}

impl GrantSource {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantSource::Purchase => "purchase",
            GrantSource::Subscription => "subscription",
            GrantSource::Promotion => "promotion",
            GrantSource::Goodwill => "goodwill",
        }
    }
}

impl std::str::FromStr for GrantSource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        serde_json::from_value(Value::String(s.to_owned()))
            .map_err(|_| Error::InvalidArgument(format!("unknown grant source {s:?}")))
    }
}

/// Credits granted into a new bucket. `debt_settled` of them paid off debt at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsGranted {
    pub account_id: Uuid,
    pub bucket_id: Uuid,
    pub grant_key: String,
    pub amount: i64,
    pub source: GrantSource,
    pub stripe_object: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub reason: Option<String>,
    pub debt_settled: i64,
}
event_type!(CreditsGranted, "CreditsGranted", 1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Draw {
    pub bucket_id: Uuid,
    pub amount: i64,
}

/// Credits held for a generation, drawn from the listed buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsReserved {
    pub account_id: Uuid,
    pub generation_id: Uuid,
    pub amount: i64,
    pub hold_expires_at: DateTime<Utc>,
    pub draws: Vec<Draw>,
}
event_type!(CreditsReserved, "CreditsReserved", 1);

/// A reservation consumed: the generation succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsCaptured {
    pub account_id: Uuid,
    pub generation_id: Uuid,
    pub amount: i64,
    /// Held credits a revocation of their bucket had claimed and the
    /// bucket's other holds cannot cover: spent after all, so owed, by
    /// bucket. Absent when none (and in events before `held` existed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owed: Vec<Draw>,
    /// What of `owed` the account's available credits paid at once, by the
    /// bucket they came from; the rest is debt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settled: Vec<Draw>,
}
event_type!(CreditsCaptured, "CreditsCaptured", 1);

impl CreditsCaptured {
    /// Credits owed by this capture, all buckets together.
    pub fn owed_total(&self) -> i64 {
        self.owed.iter().map(|d| d.amount).sum()
    }

    /// What of that the account's available credits paid at once.
    pub fn settled_total(&self) -> i64 {
        self.settled.iter().map(|d| d.amount).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleasedDraw {
    pub bucket_id: Uuid,
    pub amount: i64,
    /// Back in the bucket, available again.
    pub restored: i64,
    /// The bucket expired meanwhile: these credits lapsed.
    pub lapsed: i64,
    /// Used to pay off the account's debt.
    pub debt_settled: i64,
    /// Claimed by a revocation of the bucket while held: taken back.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub revoked: i64,
}

/// A reservation returned (failure, cancellation, stale hold): the compensating refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsReleased {
    pub account_id: Uuid,
    pub generation_id: Uuid,
    pub amount: i64,
    pub reason: String,
    pub draws: Vec<ReleasedDraw>,
}
event_type!(CreditsReleased, "CreditsReleased", 1);

/// Credits of one grant taken back (refund, lost dispute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsRevoked {
    pub account_id: Uuid,
    pub bucket_id: Uuid,
    pub revoke_key: String,
    pub stripe_object: Option<String>,
    pub amount: i64,
    /// Taken from what was left in the bucket.
    pub taken: i64,
    /// Had lapsed already: nothing to take, nothing owed.
    pub from_lapsed: i64,
    /// Held by generations: taken back when they are released, owed when
    /// they are captured. Earlier events counted held credits as debt.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held: i64,
    /// Already spent: recorded as debt.
    pub debt_added: i64,
    pub reason: Option<String>,
}
event_type!(CreditsRevoked, "CreditsRevoked", 1);

/// A bucket passed its expiry; what was left in it lapsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditsExpired {
    pub account_id: Uuid,
    pub bucket_id: Uuid,
    pub amount: i64,
}
event_type!(CreditsExpired, "CreditsExpired", 1);

/// The log's id of the `StripeEventReceived` for a Stripe event: derived
/// from Stripe's id, so receiving the same event twice appends it once.
pub fn stripe_received_event_id(stripe_event_id: &str) -> Uuid {
    const NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_5c2e_8a4b_4c1e_9b7d_2f3a_4e5d_6c7b);
    Uuid::new_v5(&NAMESPACE, stripe_event_id.as_bytes())
}

/// How a Stripe event reached Slate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StripeSource {
    Webhook,
    Reconcile,
}

impl StripeSource {
    pub fn as_str(self) -> &'static str {
        match self {
            StripeSource::Webhook => "webhook",
            StripeSource::Reconcile => "reconcile",
        }
    }
}

/// A verified Stripe event was stored in the mirror (first delivery only).
/// The raw payload stays in the mirror, out of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StripeEventReceived {
    pub stripe_event_id: String,
    pub stripe_event_type: String,
    pub created: DateTime<Utc>,
    pub livemode: bool,
    pub source: StripeSource,
    /// The typed parser could read it (false: mirrored as unparsed).
    pub parsed: bool,
}
event_type!(StripeEventReceived, "StripeEventReceived", 1);

/// A Stripe customer belongs to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StripeCustomerLinked {
    pub account_id: Uuid,
    pub customer_id: String,
}
event_type!(StripeCustomerLinked, "StripeCustomerLinked", 1);

/// The state of a subscription as of `state_at` (the Stripe event's
/// `created`). Only a state newer than the recorded one is applied, so the
/// order of arrival does not matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionStateChanged {
    pub account_id: Uuid,
    pub subscription_id: String,
    pub customer_id: Option<String>,
    pub status: String,
    pub price_id: Option<String>,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    pub canceled_at: Option<DateTime<Utc>>,
    pub state_at: DateTime<Utc>,
}
event_type!(SubscriptionStateChanged, "SubscriptionStateChanged", 1);

/// An invoice failed (`past_due`) or was paid (not past due), as of `state_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BillingStatusChanged {
    pub account_id: Uuid,
    pub past_due: bool,
    pub invoice_id: String,
    pub state_at: DateTime<Utc>,
}
event_type!(BillingStatusChanged, "BillingStatusChanged", 1);

/// A delayed checkout payment failed: nothing granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutPaymentFailed {
    pub account_id: Uuid,
    pub checkout_session_id: String,
}
event_type!(CheckoutPaymentFailed, "CheckoutPaymentFailed", 1);

/// An API key was issued. `secret_hash` is the SHA-256 (hex) of the whole
/// key; the key itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyCreated {
    pub account_id: Uuid,
    pub key_id: Uuid,
    pub prefix: String,
    pub secret_hash: String,
    /// The owner's label, sealed with the account's data key (`sealed:v1:…`,
    /// see `vault`) since 2026-12-06; older events hold it plain.
    pub label: Option<String>,
}
event_type!(ApiKeyCreated, "ApiKeyCreated", 1);

/// An API key stopped working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyRevoked {
    pub account_id: Uuid,
    pub key_id: Uuid,
}
event_type!(ApiKeyRevoked, "ApiKeyRevoked", 1);

/// An affiliate who refers customers for a commission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AffiliateCreated {
    pub affiliate_id: Uuid,
    pub name: String,
    pub referral_code: String,
    /// Commission in basis points of what a referred account pays.
    pub rate_bps: i32,
}
event_type!(AffiliateCreated, "AffiliateCreated", 1);

/// An account came through an affiliate's referral code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountReferred {
    pub account_id: Uuid,
    pub affiliate_id: Uuid,
}
event_type!(AccountReferred, "AccountReferred", 1);

/// A referred account paid: the affiliate earned `amount` (minor units) of
/// `basis` paid for `stripe_object`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommissionEarned {
    pub affiliate_id: Uuid,
    pub account_id: Uuid,
    pub stripe_object: String,
    pub currency: String,
    pub basis: i64,
    pub amount: i64,
}
event_type!(CommissionEarned, "CommissionEarned", 1);

/// A refund or lost dispute took back part of a commission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommissionClawedBack {
    pub affiliate_id: Uuid,
    pub account_id: Uuid,
    pub stripe_object: String,
    pub currency: String,
    pub amount: i64,
    pub reason: String,
}
event_type!(CommissionClawedBack, "CommissionClawedBack", 1);

/// A payout to an affiliate, as recorded by an operator (the transfer
/// itself happens outside Slate; `reference` names it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AffiliatePayoutRecorded {
    pub affiliate_id: Uuid,
    pub currency: String,
    pub amount: i64,
    pub reference: String,
}
event_type!(AffiliatePayoutRecorded, "AffiliatePayoutRecorded", 1);

/// A generation was accepted: its credits are reserved and its job queued
/// in the same transaction. The prompt is not here (see generation_inputs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequested {
    pub generation_id: Uuid,
    pub account_id: Uuid,
    pub kind: String,
    pub provider: String,
    pub operation: String,
    pub units: i32,
    pub cost: i64,
    pub collection_id: String,
    pub deadline: Option<DateTime<Utc>>,
}
event_type!(GenerationRequested, "GenerationRequested", 1);

/// A worker started an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationStarted {
    pub generation_id: Uuid,
    pub account_id: Uuid,
    pub attempt: i32,
}
event_type!(GenerationStarted, "GenerationStarted", 1);

/// The provider accepted the work under `provider_handle`; a restarted
/// worker polls it instead of submitting again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationSubmitted {
    pub generation_id: Uuid,
    pub account_id: Uuid,
    pub provider_handle: String,
}
event_type!(GenerationSubmitted, "GenerationSubmitted", 1);

/// The output is stored; the reservation is captured with this event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationSucceeded {
    pub generation_id: Uuid,
    pub account_id: Uuid,
    pub output_key: String,
    pub content_type: String,
    pub bytes: i64,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub duration_ms: Option<i64>,
}
event_type!(GenerationSucceeded, "GenerationSucceeded", 1);

/// A terminal failure; the reservation is released with this event (the
/// compensating refund).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationFailed {
    pub generation_id: Uuid,
    pub account_id: Uuid,
    pub reason_code: String,
    pub attempts: i32,
}
event_type!(GenerationFailed, "GenerationFailed", 1);

/// The user asked to stop a running generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationCancelRequested {
    pub generation_id: Uuid,
    pub account_id: Uuid,
}
event_type!(GenerationCancelRequested, "GenerationCancelRequested", 1);

/// Canceled unbilled (by the user, or its deadline passed); released with this event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationCanceled {
    pub generation_id: Uuid,
    pub account_id: Uuid,
    pub reason: String,
}
event_type!(GenerationCanceled, "GenerationCanceled", 1);

/// A prompt matched the deny-list. Only its category and SHA-256 are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptRejected {
    pub account_id: Uuid,
    pub category: String,
    /// The hex SHA-256 of the prompt, sealed with the account's data key
    /// (`sealed:v1:…`, see `vault`) since 2026-12-06; older events hold it
    /// plain.
    pub prompt_sha256: String,
}
event_type!(PromptRejected, "PromptRejected", 1);

/// A presented credential was refused. Never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthenticationFailed {
    pub reason: String,
    pub key_prefix: Option<String>,
    pub ip: Option<String>,
    pub route: String,
}
event_type!(AuthenticationFailed, "AuthenticationFailed", 1);

/// An authenticated account was refused a route it may not use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessDenied {
    pub account_id: Uuid,
    pub route: String,
}
event_type!(AccessDenied, "AccessDenied", 1);

/// A staff member read an account's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StaffRead {
    pub staff_id: Uuid,
    pub account_id: Uuid,
    pub what: String,
}
event_type!(StaffRead, "StaffRead", 1);

/// A browser session began (its token's SHA-256 only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionStarted {
    pub account_id: Uuid,
    pub session_id: Uuid,
    pub token_hash: String,
    pub via: String,
    pub expires_at: DateTime<Utc>,
}
event_type!(SessionStarted, "SessionStarted", 1);

/// A session ended (sign-out, sign-out everywhere, idle timeout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionEnded {
    pub account_id: Uuid,
    pub session_id: Uuid,
    pub reason: String,
}
event_type!(SessionEnded, "SessionEnded", 1);

/// A second factor was set up for an account (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TotpEnrolled {
    pub account_id: Uuid,
}
event_type!(TotpEnrolled, "TotpEnrolled", 1);

/// A session passed the second factor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionMfaVerified {
    pub account_id: Uuid,
    pub session_id: Uuid,
}
event_type!(SessionMfaVerified, "SessionMfaVerified", 1);

/// A staff member began acting as an account, for a stated reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImpersonationStarted {
    pub impersonation_id: Uuid,
    pub staff_id: Uuid,
    pub account_id: Uuid,
    pub reason: String,
    pub expires_at: DateTime<Utc>,
}
event_type!(ImpersonationStarted, "ImpersonationStarted", 1);

/// An impersonation ended (by the staff member, or it expired).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImpersonationEnded {
    pub impersonation_id: Uuid,
    pub staff_id: Uuid,
    pub account_id: Uuid,
    pub reason: String,
}
event_type!(ImpersonationEnded, "ImpersonationEnded", 1);

/// A request made under an impersonation, attributed to both people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImpersonatedRequest {
    pub impersonation_id: Uuid,
    pub staff_id: Uuid,
    pub account_id: Uuid,
    pub method: String,
    pub route: String,
}
event_type!(ImpersonatedRequest, "ImpersonatedRequest", 1);

/// A staff member re-ran the processing of one Stripe event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StripeEventReplayed {
    pub stripe_event_id: String,
    pub staff_id: Uuid,
    pub outcome: String,
}
event_type!(StripeEventReplayed, "StripeEventReplayed", 1);

/// The account asked to be deleted: access stops now, the purge follows after `purge_after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountDeletionRequested {
    pub account_id: Uuid,
    pub purge_after: DateTime<Utc>,
}
event_type!(AccountDeletionRequested, "AccountDeletionRequested", 1);

/// A soft-deleted account was restored within its grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountRestored {
    pub account_id: Uuid,
}
event_type!(AccountRestored, "AccountRestored", 1);

/// One step of a deleted account's purge is done (each step is idempotent;
/// a re-run skips the recorded ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountPurgeStepCompleted {
    pub account_id: Uuid,
    /// `stripe`, `storage` or `farewell_email`.
    pub step: String,
    /// What the step did, e.g. "canceled sub_…", "deleted 3 objects".
    pub detail: String,
}
event_type!(AccountPurgeStepCompleted, "AccountPurgeStepCompleted", 1);

/// The purge finished: the data key is erased (every sealed field is
/// unreadable), personal rows are gone; credits and billing stay for the books.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountPurged {
    pub account_id: Uuid,
}
event_type!(AccountPurged, "AccountPurged", 1);

/// A transactional email went out (the address is not kept here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailSent {
    pub account_id: Uuid,
    /// `deletion_scheduled` or `deletion_completed`.
    pub template: String,
    /// The email API's id for the message.
    pub message_id: String,
}
event_type!(EmailSent, "EmailSent", 1);

/// A live Stripe subscription of a deleted account was set to end at its
/// period's end (`renews: false`), so that no renewal is charged during the
/// grace period, or set to renew again when the account was restored
/// (`renews: true`). Recorded whatever Stripe needed: `changed` says
/// whether Stripe changed it, `detail` what was done or why not, e.g. "set
/// to end at the period's end", "already set to end by its owner".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionRenewalChanged {
    pub account_id: Uuid,
    pub subscription_id: String,
    /// What the account's state asked for: renew (restored) or not (deleted).
    pub renews: bool,
    pub changed: bool,
    pub detail: String,
}
event_type!(SubscriptionRenewalChanged, "SubscriptionRenewalChanged", 1);

/// Shapes that were written once and are upcast on read.
pub mod legacy {
    use super::*;

    /// AccountCreated as first written: no role.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct AccountCreatedV1 {
        pub account_id: Uuid,
        pub email: String,
    }
    event_type!(AccountCreatedV1, "AccountCreated", 1);

    impl From<AccountCreatedV1> for AccountCreated {
        fn from(v1: AccountCreatedV1) -> Self {
            AccountCreated {
                account_id: v1.account_id,
                email: v1.email,
                staff: false,
            }
        }
    }
}

/// Apply `$body` to the payload of whichever variant `$ev` is.
macro_rules! each_event {
    ($ev:expr, $e:ident => $body:expr) => {
        match $ev {
            DomainEvent::AccountCreated($e) => $body,
            DomainEvent::CreditsGranted($e) => $body,
            DomainEvent::CreditsReserved($e) => $body,
            DomainEvent::CreditsCaptured($e) => $body,
            DomainEvent::CreditsReleased($e) => $body,
            DomainEvent::CreditsRevoked($e) => $body,
            DomainEvent::CreditsExpired($e) => $body,
            DomainEvent::StripeEventReceived($e) => $body,
            DomainEvent::StripeCustomerLinked($e) => $body,
            DomainEvent::SubscriptionStateChanged($e) => $body,
            DomainEvent::BillingStatusChanged($e) => $body,
            DomainEvent::CheckoutPaymentFailed($e) => $body,
            DomainEvent::ApiKeyCreated($e) => $body,
            DomainEvent::ApiKeyRevoked($e) => $body,
            DomainEvent::AffiliateCreated($e) => $body,
            DomainEvent::AccountReferred($e) => $body,
            DomainEvent::CommissionEarned($e) => $body,
            DomainEvent::CommissionClawedBack($e) => $body,
            DomainEvent::AffiliatePayoutRecorded($e) => $body,
            DomainEvent::GenerationRequested($e) => $body,
            DomainEvent::GenerationStarted($e) => $body,
            DomainEvent::GenerationSubmitted($e) => $body,
            DomainEvent::GenerationSucceeded($e) => $body,
            DomainEvent::GenerationFailed($e) => $body,
            DomainEvent::GenerationCancelRequested($e) => $body,
            DomainEvent::GenerationCanceled($e) => $body,
            DomainEvent::PromptRejected($e) => $body,
            DomainEvent::AuthenticationFailed($e) => $body,
            DomainEvent::AccessDenied($e) => $body,
            DomainEvent::StaffRead($e) => $body,
            DomainEvent::SessionStarted($e) => $body,
            DomainEvent::SessionEnded($e) => $body,
            DomainEvent::TotpEnrolled($e) => $body,
            DomainEvent::SessionMfaVerified($e) => $body,
            DomainEvent::ImpersonationStarted($e) => $body,
            DomainEvent::ImpersonationEnded($e) => $body,
            DomainEvent::ImpersonatedRequest($e) => $body,
            DomainEvent::StripeEventReplayed($e) => $body,
            DomainEvent::AccountDeletionRequested($e) => $body,
            DomainEvent::AccountRestored($e) => $body,
            DomainEvent::AccountPurgeStepCompleted($e) => $body,
            DomainEvent::AccountPurged($e) => $body,
            DomainEvent::EmailSent($e) => $body,
            DomainEvent::SubscriptionRenewalChanged($e) => $body,
        }
    };
}

/// Every event Slate writes, in its current shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    AccountCreated(AccountCreated),
    CreditsGranted(CreditsGranted),
    CreditsReserved(CreditsReserved),
    CreditsCaptured(CreditsCaptured),
    CreditsReleased(CreditsReleased),
    CreditsRevoked(CreditsRevoked),
    CreditsExpired(CreditsExpired),
    StripeEventReceived(StripeEventReceived),
    StripeCustomerLinked(StripeCustomerLinked),
    SubscriptionStateChanged(SubscriptionStateChanged),
    BillingStatusChanged(BillingStatusChanged),
    CheckoutPaymentFailed(CheckoutPaymentFailed),
    ApiKeyCreated(ApiKeyCreated),
    ApiKeyRevoked(ApiKeyRevoked),
    AffiliateCreated(AffiliateCreated),
    AccountReferred(AccountReferred),
    CommissionEarned(CommissionEarned),
    CommissionClawedBack(CommissionClawedBack),
    AffiliatePayoutRecorded(AffiliatePayoutRecorded),
    GenerationRequested(GenerationRequested),
    GenerationStarted(GenerationStarted),
    GenerationSubmitted(GenerationSubmitted),
    GenerationSucceeded(GenerationSucceeded),
    GenerationFailed(GenerationFailed),
    GenerationCancelRequested(GenerationCancelRequested),
    GenerationCanceled(GenerationCanceled),
    PromptRejected(PromptRejected),
    AuthenticationFailed(AuthenticationFailed),
    AccessDenied(AccessDenied),
    StaffRead(StaffRead),
    SessionStarted(SessionStarted),
    SessionEnded(SessionEnded),
    TotpEnrolled(TotpEnrolled),
    SessionMfaVerified(SessionMfaVerified),
    ImpersonationStarted(ImpersonationStarted),
    ImpersonationEnded(ImpersonationEnded),
    ImpersonatedRequest(ImpersonatedRequest),
    StripeEventReplayed(StripeEventReplayed),
    AccountDeletionRequested(AccountDeletionRequested),
    AccountRestored(AccountRestored),
    AccountPurgeStepCompleted(AccountPurgeStepCompleted),
    AccountPurged(AccountPurged),
    EmailSent(EmailSent),
    SubscriptionRenewalChanged(SubscriptionRenewalChanged),
}

/// A stored payload to decode: a parsed JSON value, or the raw JSON text
/// (decoded straight into the event's type, without building a value first).
trait Payload {
    fn parse<T: DeserializeOwned>(self) -> serde_json::Result<T>;
}

impl Payload for Value {
    fn parse<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        serde_json::from_value(self)
    }
}

impl Payload for &str {
    fn parse<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        serde_json::from_str(self)
    }
}

fn parse<T: DeserializeOwned>(
    event_type: &str,
    version: i16,
    payload: impl Payload,
) -> Result<T, Error> {
    payload.parse().map_err(|e| Error::Decode {
        event_type: event_type.to_owned(),
        schema_version: version,
        reason: e.to_string(),
    })
}

impl DomainEvent {
    /// Decode a stored payload, upcasting older schema versions.
    pub fn decode(event_type: &str, schema_version: i16, payload: Value) -> Result<Self, Error> {
        Self::decode_payload(event_type, schema_version, payload)
    }

    /// [`DomainEvent::decode`] from the payload's JSON text.
    pub fn decode_text(
        event_type: &str,
        schema_version: i16,
        payload: &str,
    ) -> Result<Self, Error> {
        Self::decode_payload(event_type, schema_version, payload)
    }

    fn decode_payload(
        event_type: &str,
        schema_version: i16,
        payload: impl Payload,
    ) -> Result<Self, Error> {
        use DomainEvent as E;
        let p = payload;
        let v = schema_version;
        Ok(match (event_type, v) {
            ("AccountCreated", 1) => {
                E::AccountCreated(parse::<legacy::AccountCreatedV1>(event_type, v, p)?.into())
            }
            ("AccountCreated", 2) => E::AccountCreated(parse(event_type, v, p)?),
            ("CreditsGranted", 1) => E::CreditsGranted(parse(event_type, v, p)?),
            ("CreditsReserved", 1) => E::CreditsReserved(parse(event_type, v, p)?),
            ("CreditsCaptured", 1) => E::CreditsCaptured(parse(event_type, v, p)?),
            ("CreditsReleased", 1) => E::CreditsReleased(parse(event_type, v, p)?),
            ("CreditsRevoked", 1) => E::CreditsRevoked(parse(event_type, v, p)?),
            ("CreditsExpired", 1) => E::CreditsExpired(parse(event_type, v, p)?),
            ("StripeEventReceived", 1) => E::StripeEventReceived(parse(event_type, v, p)?),
            ("StripeCustomerLinked", 1) => E::StripeCustomerLinked(parse(event_type, v, p)?),
            ("SubscriptionStateChanged", 1) => {
                E::SubscriptionStateChanged(parse(event_type, v, p)?)
            }
            ("BillingStatusChanged", 1) => E::BillingStatusChanged(parse(event_type, v, p)?),
            ("CheckoutPaymentFailed", 1) => E::CheckoutPaymentFailed(parse(event_type, v, p)?),
            ("ApiKeyCreated", 1) => E::ApiKeyCreated(parse(event_type, v, p)?),
            ("ApiKeyRevoked", 1) => E::ApiKeyRevoked(parse(event_type, v, p)?),
            ("AffiliateCreated", 1) => E::AffiliateCreated(parse(event_type, v, p)?),
            ("AccountReferred", 1) => E::AccountReferred(parse(event_type, v, p)?),
            ("CommissionEarned", 1) => E::CommissionEarned(parse(event_type, v, p)?),
            ("CommissionClawedBack", 1) => E::CommissionClawedBack(parse(event_type, v, p)?),
            ("AffiliatePayoutRecorded", 1) => E::AffiliatePayoutRecorded(parse(event_type, v, p)?),
            ("GenerationRequested", 1) => E::GenerationRequested(parse(event_type, v, p)?),
            ("GenerationStarted", 1) => E::GenerationStarted(parse(event_type, v, p)?),
            ("GenerationSubmitted", 1) => E::GenerationSubmitted(parse(event_type, v, p)?),
            ("GenerationSucceeded", 1) => E::GenerationSucceeded(parse(event_type, v, p)?),
            ("GenerationFailed", 1) => E::GenerationFailed(parse(event_type, v, p)?),
            ("GenerationCancelRequested", 1) => {
                E::GenerationCancelRequested(parse(event_type, v, p)?)
            }
            ("GenerationCanceled", 1) => E::GenerationCanceled(parse(event_type, v, p)?),
            ("PromptRejected", 1) => E::PromptRejected(parse(event_type, v, p)?),
            ("AuthenticationFailed", 1) => E::AuthenticationFailed(parse(event_type, v, p)?),
            ("AccessDenied", 1) => E::AccessDenied(parse(event_type, v, p)?),
            ("StaffRead", 1) => E::StaffRead(parse(event_type, v, p)?),
            ("SessionStarted", 1) => E::SessionStarted(parse(event_type, v, p)?),
            ("SessionEnded", 1) => E::SessionEnded(parse(event_type, v, p)?),
            ("TotpEnrolled", 1) => E::TotpEnrolled(parse(event_type, v, p)?),
            ("SessionMfaVerified", 1) => E::SessionMfaVerified(parse(event_type, v, p)?),
            ("ImpersonationStarted", 1) => E::ImpersonationStarted(parse(event_type, v, p)?),
            ("ImpersonationEnded", 1) => E::ImpersonationEnded(parse(event_type, v, p)?),
            ("ImpersonatedRequest", 1) => E::ImpersonatedRequest(parse(event_type, v, p)?),
            ("StripeEventReplayed", 1) => E::StripeEventReplayed(parse(event_type, v, p)?),
            ("AccountDeletionRequested", 1) => {
                E::AccountDeletionRequested(parse(event_type, v, p)?)
            }
            ("AccountRestored", 1) => E::AccountRestored(parse(event_type, v, p)?),
            ("AccountPurgeStepCompleted", 1) => {
                E::AccountPurgeStepCompleted(parse(event_type, v, p)?)
            }
            ("AccountPurged", 1) => E::AccountPurged(parse(event_type, v, p)?),
            ("EmailSent", 1) => E::EmailSent(parse(event_type, v, p)?),
            ("SubscriptionRenewalChanged", 1) => {
                E::SubscriptionRenewalChanged(parse(event_type, v, p)?)
            }
            _ => {
                return Err(Error::Decode {
                    event_type: event_type.to_owned(),
                    schema_version: v,
                    reason: "unknown event type or version".into(),
                });
            }
        })
    }

    pub fn event_type(&self) -> &'static str {
        each_event!(self, e => name_of(e))
    }

    /// The schema version written for this event today.
    pub fn schema_version(&self) -> i16 {
        each_event!(self, e => version_of(e))
    }

    pub fn payload(&self) -> Value {
        each_event!(self, e => serde_json::to_value(e).expect("catalog types serialize"))
    }

    /// The account this event concerns, if any.
    pub fn account_id(&self) -> Option<Uuid> {
        use DomainEvent as E;
        match self {
            E::AccountCreated(e) => Some(e.account_id),
            E::CreditsGranted(e) => Some(e.account_id),
            E::CreditsReserved(e) => Some(e.account_id),
            E::CreditsCaptured(e) => Some(e.account_id),
            E::CreditsReleased(e) => Some(e.account_id),
            E::CreditsRevoked(e) => Some(e.account_id),
            E::CreditsExpired(e) => Some(e.account_id),
            E::StripeEventReceived(_) => None,
            E::StripeCustomerLinked(e) => Some(e.account_id),
            E::SubscriptionStateChanged(e) => Some(e.account_id),
            E::BillingStatusChanged(e) => Some(e.account_id),
            E::CheckoutPaymentFailed(e) => Some(e.account_id),
            E::ApiKeyCreated(e) => Some(e.account_id),
            E::ApiKeyRevoked(e) => Some(e.account_id),
            E::AffiliateCreated(_) | E::AffiliatePayoutRecorded(_) => None,
            E::AccountReferred(e) => Some(e.account_id),
            E::CommissionEarned(e) => Some(e.account_id),
            E::CommissionClawedBack(e) => Some(e.account_id),
            E::GenerationRequested(e) => Some(e.account_id),
            E::GenerationStarted(e) => Some(e.account_id),
            E::GenerationSubmitted(e) => Some(e.account_id),
            E::GenerationSucceeded(e) => Some(e.account_id),
            E::GenerationFailed(e) => Some(e.account_id),
            E::GenerationCancelRequested(e) => Some(e.account_id),
            E::GenerationCanceled(e) => Some(e.account_id),
            E::PromptRejected(e) => Some(e.account_id),
            E::AuthenticationFailed(_) => None,
            E::AccessDenied(e) => Some(e.account_id),
            E::StaffRead(e) => Some(e.account_id),
            E::SessionStarted(e) => Some(e.account_id),
            E::SessionEnded(e) => Some(e.account_id),
            E::TotpEnrolled(e) => Some(e.account_id),
            E::SessionMfaVerified(e) => Some(e.account_id),
            E::ImpersonationStarted(e) => Some(e.account_id),
            E::ImpersonationEnded(e) => Some(e.account_id),
            E::ImpersonatedRequest(e) => Some(e.account_id),
            E::StripeEventReplayed(_) => None,
            E::AccountDeletionRequested(e) => Some(e.account_id),
            E::AccountRestored(e) => Some(e.account_id),
            E::AccountPurgeStepCompleted(e) => Some(e.account_id),
            E::AccountPurged(e) => Some(e.account_id),
            E::EmailSent(e) => Some(e.account_id),
            E::SubscriptionRenewalChanged(e) => Some(e.account_id),
        }
    }
}

fn name_of<T: EventType>(_: &T) -> &'static str {
    T::NAME
}

fn version_of<T: EventType>(_: &T) -> i16 {
    T::VERSION
}

/// One exported schema file: `<name>.v<version>.schema.json`.
pub struct SchemaFile {
    pub file_name: String,
    pub contents: String,
}

fn schema_file<T: EventType>(current: bool) -> SchemaFile {
    let mut schema = schemars::schema_for!(T);
    schema.insert(
        "title".into(),
        Value::String(format!("{} v{}", T::NAME, T::VERSION)),
    );
    schema.insert("x-event-type".into(), Value::String(T::NAME.into()));
    schema.insert("x-schema-version".into(), Value::from(T::VERSION));
    schema.insert("x-current".into(), Value::Bool(current));
    let mut contents = serde_json::to_string_pretty(&schema).expect("schema serializes");
    contents.push('\n');
    SchemaFile {
        file_name: format!("{}.v{}.schema.json", T::NAME, T::VERSION),
        contents,
    }
}

/// The whole catalog as JSON Schema files, in a stable order, plus the
/// metadata schema.
pub fn schema_files() -> Vec<SchemaFile> {
    let mut files = vec![
        schema_file::<legacy::AccountCreatedV1>(false),
        schema_file::<AccountCreated>(true),
        schema_file::<CreditsGranted>(true),
        schema_file::<CreditsReserved>(true),
        schema_file::<CreditsCaptured>(true),
        schema_file::<CreditsReleased>(true),
        schema_file::<CreditsRevoked>(true),
        schema_file::<CreditsExpired>(true),
        schema_file::<StripeEventReceived>(true),
        schema_file::<StripeCustomerLinked>(true),
        schema_file::<SubscriptionStateChanged>(true),
        schema_file::<BillingStatusChanged>(true),
        schema_file::<CheckoutPaymentFailed>(true),
        schema_file::<ApiKeyCreated>(true),
        schema_file::<ApiKeyRevoked>(true),
        schema_file::<AffiliateCreated>(true),
        schema_file::<AccountReferred>(true),
        schema_file::<CommissionEarned>(true),
        schema_file::<CommissionClawedBack>(true),
        schema_file::<AffiliatePayoutRecorded>(true),
        schema_file::<GenerationRequested>(true),
        schema_file::<GenerationStarted>(true),
        schema_file::<GenerationSubmitted>(true),
        schema_file::<GenerationSucceeded>(true),
        schema_file::<GenerationFailed>(true),
        schema_file::<GenerationCancelRequested>(true),
        schema_file::<GenerationCanceled>(true),
        schema_file::<PromptRejected>(true),
        schema_file::<AuthenticationFailed>(true),
        schema_file::<AccessDenied>(true),
        schema_file::<StaffRead>(true),
        schema_file::<SessionStarted>(true),
        schema_file::<SessionEnded>(true),
        schema_file::<TotpEnrolled>(true),
        schema_file::<SessionMfaVerified>(true),
        schema_file::<ImpersonationStarted>(true),
        schema_file::<ImpersonationEnded>(true),
        schema_file::<ImpersonatedRequest>(true),
        schema_file::<StripeEventReplayed>(true),
        schema_file::<AccountDeletionRequested>(true),
        schema_file::<AccountRestored>(true),
        schema_file::<AccountPurgeStepCompleted>(true),
        schema_file::<AccountPurged>(true),
        schema_file::<EmailSent>(true),
        schema_file::<SubscriptionRenewalChanged>(true),
    ];
    let mut meta =
        serde_json::to_string_pretty(&schemars::schema_for!(Metadata)).expect("schema serializes");
    meta.push('\n');
    files.push(SchemaFile {
        file_name: "Metadata.schema.json".into(),
        contents: meta,
    });
    files
}
