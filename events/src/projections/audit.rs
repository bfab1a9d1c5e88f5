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

/// The action of a staff member's read of an account's data.
pub const STAFF_READ: &str = "staff.read";

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
    "SubscriptionRenewalChanged",
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
        targets: match targets {
            Value::Object(map) => map,
            _ => Map::new(),
        },
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
        E::CreditsCaptured(e) => {
            let mut details = json!({"generation": e.generation_id, "amount": e.amount});
            let (owed, settled) = (e.owed_total(), e.settled_total());
            if owed > 0 {
                details["owed"] = owed.into();
            }
            if settled > 0 {
                details["debt_settled"] = settled.into();
            }
            entry("credits.captured", Some(e.account_id), details)
        }
        E::CreditsReleased(e) => {
            let mut x = entry(
                "credits.released",
                Some(e.account_id),
                json!({"generation": e.generation_id, "amount": e.amount}),
            );
            x.reason = Some(e.reason.clone());
            x
        }
        E::CreditsRevoked(e) => {
            let mut details = json!({"bucket": e.bucket_id, "stripe_object": e.stripe_object, "amount": e.amount, "debt_added": e.debt_added});
            // Only when some were: entries written before `held` have none.
            if e.held > 0 {
                details["held"] = e.held.into();
            }
            entry("credits.revoked", Some(e.account_id), details)
        }
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
            STAFF_READ,
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
        E::SubscriptionRenewalChanged(e) => {
            let mut x = entry(
                match (e.changed, e.renews) {
                    (true, true) => "subscription.renewal_resumed",
                    (true, false) => "subscription.renewal_stopped",
                    (false, _) => "subscription.renewal_unchanged",
                },
                Some(e.account_id),
                json!({"subscription": e.subscription_id}),
            );
            x.reason = Some(e.detail.clone());
            x
        }
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

/// One entry per event, in one INSERT (projector batches and verify);
/// events past the retention cutoff are skipped (the events themselves stay).
pub async fn apply_many(
    conn: &mut PgConnection,
    p: &str,
    events: &[(&RecordedEvent, DomainEvent)],
) -> Result<(), Error> {
    let mut rows = Rows::default();
    for (recorded, event) in events {
        rows.push(AuditRow::new(
            recorded.global_position,
            recorded.event_id,
            recorded.recorded_at,
            MetaFields::from_value(&recorded.metadata),
            event,
        ));
    }
    if rows.position.is_empty() {
        return Ok(());
    }
    sqlx::query(trusted_sql!(
        "insert into {p}audit_entries ({COLUMNS})
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

/// The columns an entry is written with, in the order of [`AuditRow`]
/// (`seq` is assigned by the table, in apply order).
const COLUMNS: &str = "position, event_id, at, actor_kind, actor_id, impersonator, action, \
     account_id, targets, outcome, request_id, reason, api_key_id, ip, user_agent";

/// One audit entry, as written.
pub(crate) struct AuditRow<'a> {
    position: i64,
    event_id: Uuid,
    at: DateTime<Utc>,
    actor_kind: &'a str,
    actor_id: Option<&'a str>,
    impersonator: Option<Uuid>,
    action: &'static str,
    account: Option<Uuid>,
    targets: Value,
    outcome: &'static str,
    request_id: Option<&'a str>,
    reason: Option<String>,
    api_key_id: Option<Uuid>,
    ip: Option<&'a str>,
    user_agent: Option<&'a str>,
}

impl<'a> AuditRow<'a> {
    /// The entry of an event, from its position, id, time and metadata.
    pub(crate) fn new(
        position: i64,
        event_id: Uuid,
        at: DateTime<Utc>,
        meta: MetaFields<'a>,
        event: &DomainEvent,
    ) -> Self {
        let mut e = describe(event);
        if let Some(stripe_event) = meta.stripe_event_id {
            e.targets
                .entry("stripe_event")
                .or_insert_with(|| Value::String(stripe_event.to_owned()));
        }
        e.targets.retain(|_, v| !v.is_null());
        AuditRow {
            position,
            event_id,
            at,
            actor_kind: meta.actor_kind.unwrap_or("system"),
            actor_id: meta.actor_id,
            impersonator: meta.impersonator.and_then(|s| s.parse().ok()),
            action: e.action,
            account: e.account,
            targets: Value::Object(e.targets),
            outcome: e.outcome,
            request_id: meta.request_id,
            reason: e.reason,
            api_key_id: meta.api_key_id.and_then(|s| s.parse().ok()),
            ip: meta.ip,
            user_agent: meta.user_agent,
        }
    }

    /// Append this row to a binary `COPY` body ([`COPY_HEADER`] first,
    /// [`COPY_TRAILER`] last), fields in [`COLUMNS`] order.
    pub(crate) fn encode_copy(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&15i16.to_be_bytes());
        copy::int8(buf, self.position);
        copy::uuid(buf, Some(self.event_id));
        copy::timestamptz(buf, self.at);
        copy::text(buf, Some(self.actor_kind));
        copy::text(buf, self.actor_id);
        copy::uuid(buf, self.impersonator);
        copy::text(buf, Some(self.action));
        copy::uuid(buf, self.account);
        copy::jsonb(buf, &self.targets);
        copy::text(buf, Some(self.outcome));
        copy::text(buf, self.request_id);
        copy::text(buf, self.reason.as_deref());
        copy::uuid(buf, self.api_key_id);
        copy::text(buf, self.ip);
        copy::text(buf, self.user_agent);
    }
}

/// The metadata an entry uses. A field that is missing or not a string
/// counts as absent; the actor's id is its `account_id` when that key is
/// there at all, its `name` otherwise.
#[derive(Default)]
pub(crate) struct MetaFields<'a> {
    actor_kind: Option<&'a str>,
    actor_id: Option<&'a str>,
    impersonator: Option<&'a str>,
    request_id: Option<&'a str>,
    stripe_event_id: Option<&'a str>,
    api_key_id: Option<&'a str>,
    ip: Option<&'a str>,
    user_agent: Option<&'a str>,
}

impl<'a> MetaFields<'a> {
    fn from_value(meta: &'a Value) -> Self {
        let text = |k: &str| meta.get(k).and_then(Value::as_str);
        let actor = meta.get("actor").unwrap_or(&Value::Null);
        MetaFields {
            actor_kind: actor.get("kind").and_then(Value::as_str),
            actor_id: actor
                .get("account_id")
                .or_else(|| actor.get("name"))
                .and_then(Value::as_str),
            impersonator: text("impersonator"),
            request_id: text("request_id"),
            stripe_event_id: text("stripe_event_id"),
            api_key_id: text("api_key_id"),
            ip: text("ip"),
            user_agent: text("user_agent"),
        }
    }

    fn from_text(meta: &'a MetaText<'_>) -> Self {
        let a = &meta.actor;
        MetaFields {
            actor_kind: a.kind.as_str(),
            actor_id: match a.account_id {
                Field::Absent => a.name.as_str(),
                ref id => id.as_str(),
            },
            impersonator: meta.impersonator.as_str(),
            request_id: meta.request_id.as_str(),
            stripe_event_id: meta.stripe_event_id.as_str(),
            api_key_id: meta.api_key_id.as_str(),
            ip: meta.ip.as_str(),
            user_agent: meta.user_agent.as_str(),
        }
    }
}

/// Metadata read straight from its JSON text, without building a value:
/// only the fields [`MetaFields`] uses, with the same meaning (anything that
/// is not an object has none of them; a repeated key keeps its last value).
#[derive(Default)]
pub(crate) struct MetaText<'a> {
    actor: ActorText<'a>,
    impersonator: Field<'a>,
    request_id: Field<'a>,
    stripe_event_id: Field<'a>,
    api_key_id: Field<'a>,
    ip: Field<'a>,
    user_agent: Field<'a>,
}

#[derive(Default)]
struct ActorText<'a> {
    kind: Field<'a>,
    account_id: Field<'a>,
    name: Field<'a>,
}

/// One metadata field: missing, present but not a string, or a string.
#[derive(Default)]
enum Field<'a> {
    #[default]
    Absent,
    Other,
    Str(std::borrow::Cow<'a, str>),
}

impl Field<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            _ => None,
        }
    }
}

mod meta_text {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

    use super::{ActorText, Field, MetaText};

    /// A key or string, borrowed when it has no escapes.
    struct Text<'a>(Cow<'a, str>);

    impl<'de> Deserialize<'de> for Text<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Text<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                    Ok(Text(Cow::Borrowed(s)))
                }
                fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                    Ok(Text(Cow::Owned(s.to_owned())))
                }
                fn visit_string<E>(self, s: String) -> Result<Text<'de>, E> {
                    Ok(Text(Cow::Owned(s)))
                }
            }
            d.deserialize_str(V)
        }
    }

    /// Any JSON value: a string, or "something else".
    struct AnyField;

    impl<'de> Visitor<'de> for AnyField {
        type Value = Field<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Field<'de>, E> {
            Ok(Field::Str(Cow::Borrowed(s)))
        }
        fn visit_str<E>(self, s: &str) -> Result<Field<'de>, E> {
            Ok(Field::Str(Cow::Owned(s.to_owned())))
        }
        fn visit_string<E>(self, s: String) -> Result<Field<'de>, E> {
            Ok(Field::Str(Cow::Owned(s)))
        }
        fn visit_bool<E>(self, _: bool) -> Result<Field<'de>, E> {
            Ok(Field::Other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Field<'de>, E> {
            Ok(Field::Other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Field<'de>, E> {
            Ok(Field::Other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Field<'de>, E> {
            Ok(Field::Other)
        }
        fn visit_unit<E>(self) -> Result<Field<'de>, E> {
            Ok(Field::Other)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field<'de>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Field::Other)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field<'de>, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(Field::Other)
        }
    }

    impl<'de> Deserialize<'de> for Field<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(AnyField)
        }
    }

    /// An object's fields through `field`; anything else has none.
    macro_rules! object_visitor {
        ($name:ident, $ty:ident, |$out:ident, $key:ident, $map:ident| $body:block) => {
            struct $name;
            impl<'de> Visitor<'de> for $name {
                type Value = $ty<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut $map: A) -> Result<$ty<'de>, A::Error> {
                    let mut $out = $ty::default();
                    while let Some(Text($key)) = $map.next_key::<Text<'de>>()? $body
                    Ok($out)
                }
                fn visit_borrowed_str<E>(self, _: &'de str) -> Result<$ty<'de>, E> {
                    Ok($ty::default())
                }
                fn visit_str<E>(self, _: &str) -> Result<$ty<'de>, E> {
                    Ok($ty::default())
                }
                fn visit_bool<E>(self, _: bool) -> Result<$ty<'de>, E> {
                    Ok($ty::default())
                }
                fn visit_i64<E>(self, _: i64) -> Result<$ty<'de>, E> {
                    Ok($ty::default())
                }
                fn visit_u64<E>(self, _: u64) -> Result<$ty<'de>, E> {
                    Ok($ty::default())
                }
                fn visit_f64<E>(self, _: f64) -> Result<$ty<'de>, E> {
                    Ok($ty::default())
                }
                fn visit_unit<E>(self) -> Result<$ty<'de>, E> {
                    Ok($ty::default())
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<$ty<'de>, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok($ty::default())
                }
            }
            impl<'de> Deserialize<'de> for $ty<'de> {
                fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                    d.deserialize_any($name)
                }
            }
        };
    }

    object_visitor!(ActorVisitor, ActorText, |out, key, map| {
        match &*key {
            "kind" => out.kind = map.next_value()?,
            "account_id" => out.account_id = map.next_value()?,
            "name" => out.name = map.next_value()?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    });

    object_visitor!(MetaVisitor, MetaText, |out, key, map| {
        match &*key {
            "actor" => out.actor = map.next_value()?,
            "impersonator" => out.impersonator = map.next_value()?,
            "request_id" => out.request_id = map.next_value()?,
            "stripe_event_id" => out.stripe_event_id = map.next_value()?,
            "api_key_id" => out.api_key_id = map.next_value()?,
            "ip" => out.ip = map.next_value()?,
            "user_agent" => out.user_agent = map.next_value()?,
            _ => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    });
}

/// Entries as columns, for one `unnest` INSERT.
#[derive(Default)]
struct Rows<'a> {
    position: Vec<i64>,
    event_id: Vec<Uuid>,
    at: Vec<DateTime<Utc>>,
    actor_kind: Vec<&'a str>,
    actor_id: Vec<Option<&'a str>>,
    impersonator: Vec<Option<Uuid>>,
    action: Vec<&'static str>,
    account: Vec<Option<Uuid>>,
    targets: Vec<Value>,
    outcome: Vec<&'static str>,
    request_id: Vec<Option<&'a str>>,
    reason: Vec<Option<String>>,
    api_key_id: Vec<Option<Uuid>>,
    ip: Vec<Option<&'a str>>,
    user_agent: Vec<Option<&'a str>>,
}

impl<'a> Rows<'a> {
    fn push(&mut self, row: AuditRow<'a>) {
        self.position.push(row.position);
        self.event_id.push(row.event_id);
        self.at.push(row.at);
        self.actor_kind.push(row.actor_kind);
        self.actor_id.push(row.actor_id);
        self.impersonator.push(row.impersonator);
        self.action.push(row.action);
        self.account.push(row.account);
        self.targets.push(row.targets);
        self.outcome.push(row.outcome);
        self.request_id.push(row.request_id);
        self.reason.push(row.reason);
        self.api_key_id.push(row.api_key_id);
        self.ip.push(row.ip);
        self.user_agent.push(row.user_agent);
    }
}

/// The `COPY ... from stdin (format binary)` statement for the live table.
pub(crate) fn copy_statement() -> String {
    format!("copy audit_entries ({COLUMNS}) from stdin (format binary)")
}

pub(crate) const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
pub(crate) const COPY_TRAILER: &[u8] = &(-1i16).to_be_bytes();

/// PostgreSQL's binary COPY encoding of the field types an entry uses.
mod copy {
    use chrono::{DateTime, Utc};
    use serde_json::Value;
    use uuid::Uuid;

    /// 2000-01-01T00:00:00Z in Unix microseconds: PostgreSQL's epoch.
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

    fn null(buf: &mut Vec<u8>) {
        buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    pub fn int8(buf: &mut Vec<u8>, v: i64) {
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&v.to_be_bytes());
    }

    pub fn uuid(buf: &mut Vec<u8>, v: Option<Uuid>) {
        match v {
            Some(v) => {
                buf.extend_from_slice(&16i32.to_be_bytes());
                buf.extend_from_slice(v.as_bytes());
            }
            None => null(buf),
        }
    }

    pub fn timestamptz(buf: &mut Vec<u8>, v: DateTime<Utc>) {
        int8(buf, v.timestamp_micros() - PG_EPOCH_MICROS);
    }

    pub fn text(buf: &mut Vec<u8>, v: Option<&str>) {
        match v {
            Some(v) => {
                buf.extend_from_slice(&(v.len() as i32).to_be_bytes());
                buf.extend_from_slice(v.as_bytes());
            }
            None => null(buf),
        }
    }

    /// jsonb: a version byte (1), then the JSON text.
    pub fn jsonb(buf: &mut Vec<u8>, v: &Value) {
        let at = buf.len();
        buf.extend_from_slice(&[0, 0, 0, 0, 1]);
        serde_json::to_writer(&mut *buf, v).expect("a JSON value serializes");
        let len = (buf.len() - at - 4) as i32;
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
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

/// Events a page of the bulk rebuild reads.
const BULK_PAGE: i64 = 20_000;
/// Bytes of encoded entries per message from the reader to the writer.
const BULK_CHUNK: usize = 256 * 1024;

/// The bulk part of a full rebuild: every event of a transaction older than
/// every running one (the gap-safe horizon, fixed at the start) becomes an
/// entry in the live table, in (transaction_id, global_position) order, in
/// one binary COPY on `conn` (the rebuild's transaction, which holds the
/// truncated table and the checkpoint). A second connection (with `pool`'s
/// options) reads the log and encodes entries meanwhile. Returns the position of the last
/// event read (for the checkpoint) and how many were read.
///
/// Every transaction below the horizon has ended, so the reading connection
/// (whose snapshot is taken later) sees all of their events, and no event
/// can be added below it later.
pub(crate) async fn copy_from_log(
    pool: &sqlx::PgPool,
    conn: &mut PgConnection,
) -> Result<Option<(String, i64, u64)>, Error> {
    let horizon: String =
        sqlx::query_scalar("select pg_snapshot_xmin(pg_current_snapshot())::text")
            .fetch_one(&mut *conn)
            .await?;
    // Entries older than the retention cutoff are not kept ('-infinity':
    // none is older).
    let cutoff: Option<DateTime<Utc>> =
        sqlx::query_scalar("select nullif(cutoff, '-infinity') from audit_retention")
            .fetch_one(&mut *conn)
            .await?;
    // Its own connection, not one from the pool: the rebuild must not wait
    // for (or deadlock on) a pool of one that its transaction already holds.
    let mut reader = crate::db::connect_one(&pool.connect_options()).await?;
    let (chunks, mut received) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let read = async move {
        let mut after: (String, i64) = ("0".into(), 0);
        let mut count = 0u64;
        let mut buf = Vec::with_capacity(BULK_CHUNK + 4096);
        loop {
            let mut page = sqlx::query(
                "select e.transaction_id::text, e.global_position, e.event_id, e.event_type,
                        e.schema_version, e.payload::text, e.metadata::text, e.recorded_at
                   from events e
                  where (e.transaction_id, e.global_position) > ($1::xid8, $2)
                    and e.transaction_id < $3::xid8
                    and e.event_type = any($4)
                  order by e.transaction_id, e.global_position
                  limit $5",
            )
            .bind(&after.0)
            .bind(after.1)
            .bind(&horizon)
            .bind(EVENT_TYPES)
            .bind(BULK_PAGE)
            .fetch(&mut reader);
            let mut rows = 0i64;
            let (mut last_txid, mut last_position) = (String::new(), 0i64);
            while let Some(row) = futures::TryStreamExt::try_next(&mut page).await? {
                use sqlx::Row;
                let position: i64 = row.try_get(1)?;
                let at: DateTime<Utc> = row.try_get(7)?;
                rows += 1;
                if cutoff.is_none_or(|c| at >= c) {
                    let event_type: &str = row.try_get(3)?;
                    let event =
                        DomainEvent::decode_text(event_type, row.try_get(4)?, row.try_get(5)?)?;
                    let metadata: MetaText = serde_json::from_str(row.try_get(6)?)
                        .map_err(|e| sqlx::Error::Decode(e.into()))?;
                    AuditRow::new(
                        position,
                        row.try_get(2)?,
                        at,
                        MetaFields::from_text(&metadata),
                        &event,
                    )
                    .encode_copy(&mut buf);
                    if buf.len() >= BULK_CHUNK {
                        let full =
                            std::mem::replace(&mut buf, Vec::with_capacity(BULK_CHUNK + 4096));
                        if chunks.send(full).await.is_err() {
                            // The writer failed; its error is the one to report.
                            return Ok(None);
                        }
                    }
                }
                last_txid.clear();
                last_txid.push_str(row.try_get(0)?);
                last_position = position;
            }
            drop(page);
            count += rows as u64;
            if rows > 0 {
                after = (last_txid.clone(), last_position);
            }
            if rows < BULK_PAGE {
                break;
            }
        }
        if !buf.is_empty() && chunks.send(buf).await.is_err() {
            return Ok(None);
        }
        sqlx::Connection::close(reader).await.ok();
        Ok::<_, Error>((count > 0).then_some((after.0, after.1, count)))
    };
    let write = async {
        let mut copy = conn.copy_in_raw(&copy_statement()).await?;
        copy.send(COPY_HEADER).await?;
        while let Some(chunk) = received.recv().await {
            copy.send(chunk).await?;
        }
        copy.send(COPY_TRAILER).await?;
        copy.finish().await?;
        Ok::<_, Error>(())
    };
    let (last, ()) = tokio::try_join!(read, write)?;
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bulk rebuild reads metadata from its text, the projector from a
    /// parsed value: the same fields either way, whatever the shape.
    #[test]
    fn metadata_fields_read_from_text_match_those_read_from_a_value() {
        let cases = [
            r#"{"actor": {"kind": "user", "account_id": "0195d3a8-0000-7000-8000-000000000001"},
                "impersonator": "0195d3a8-0000-7000-8000-000000000002", "request_id": "req-1",
                "stripe_event_id": "evt_1", "api_key_id": "nope", "ip": "203.0.113.7",
                "user_agent": "tab\there \"q\" \\ \u00fc \ud83d\ude00", "causation_id": null}"#,
            r#"{"actor": {"kind": "operator", "name": "op\nname"}}"#,
            r#"{"actor": {"kind": "staff", "account_id": null, "name": "shadowed"}}"#,
            r#"{"actor": {"kind": 7, "account_id": 5, "name": "x"}, "request_id": 5, "ip": [1, {"a": 2}]}"#,
            r#"{"actor": "system", "user_agent": {"nested": ["x"]}, "request_id": 1.5e3}"#,
            r#"{"actor": [], "ip": true, "user_agent": false, "request_id": -3}"#,
            r#"{"act\u006fr": {"k\u0069nd": "stripe"}, "request_id": "a", "request_id": "b"}"#,
            r#"{}"#,
            r#"[]"#,
            r#""text""#,
            r#"null"#,
            r#"42"#,
        ];
        for case in cases {
            let value: Value = serde_json::from_str(case).unwrap();
            let text: MetaText = serde_json::from_str(case).unwrap();
            let (a, b) = (MetaFields::from_value(&value), MetaFields::from_text(&text));
            let fields = |m: &MetaFields| {
                [
                    m.actor_kind,
                    m.actor_id,
                    m.impersonator,
                    m.request_id,
                    m.stripe_event_id,
                    m.api_key_id,
                    m.ip,
                    m.user_agent,
                ]
                .map(|f| f.map(str::to_owned))
            };
            assert_eq!(fields(&a), fields(&b), "{case}");
        }
    }
}
