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
}
event_type!(CreditsCaptured, "CreditsCaptured", 1);

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
    /// Already spent or held: recorded as debt.
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
}

fn parse<T: DeserializeOwned>(event_type: &str, version: i16, payload: Value) -> Result<T, Error> {
    serde_json::from_value(payload).map_err(|e| Error::Decode {
        event_type: event_type.to_owned(),
        schema_version: version,
        reason: e.to_string(),
    })
}

impl DomainEvent {
    /// Decode a stored payload, upcasting older schema versions.
    pub fn decode(event_type: &str, schema_version: i16, payload: Value) -> Result<Self, Error> {
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
        match self {
            DomainEvent::AccountCreated(_) => AccountCreated::NAME,
            DomainEvent::CreditsGranted(_) => CreditsGranted::NAME,
            DomainEvent::CreditsReserved(_) => CreditsReserved::NAME,
            DomainEvent::CreditsCaptured(_) => CreditsCaptured::NAME,
            DomainEvent::CreditsReleased(_) => CreditsReleased::NAME,
            DomainEvent::CreditsRevoked(_) => CreditsRevoked::NAME,
            DomainEvent::CreditsExpired(_) => CreditsExpired::NAME,
        }
    }

    /// The schema version written for this event today.
    pub fn schema_version(&self) -> i16 {
        match self {
            DomainEvent::AccountCreated(_) => AccountCreated::VERSION,
            DomainEvent::CreditsGranted(_) => CreditsGranted::VERSION,
            DomainEvent::CreditsReserved(_) => CreditsReserved::VERSION,
            DomainEvent::CreditsCaptured(_) => CreditsCaptured::VERSION,
            DomainEvent::CreditsReleased(_) => CreditsReleased::VERSION,
            DomainEvent::CreditsRevoked(_) => CreditsRevoked::VERSION,
            DomainEvent::CreditsExpired(_) => CreditsExpired::VERSION,
        }
    }

    pub fn payload(&self) -> Value {
        let v = match self {
            DomainEvent::AccountCreated(e) => serde_json::to_value(e),
            DomainEvent::CreditsGranted(e) => serde_json::to_value(e),
            DomainEvent::CreditsReserved(e) => serde_json::to_value(e),
            DomainEvent::CreditsCaptured(e) => serde_json::to_value(e),
            DomainEvent::CreditsReleased(e) => serde_json::to_value(e),
            DomainEvent::CreditsRevoked(e) => serde_json::to_value(e),
            DomainEvent::CreditsExpired(e) => serde_json::to_value(e),
        };
        v.expect("catalog types serialize")
    }

    /// The account this event concerns.
    pub fn account_id(&self) -> Uuid {
        match self {
            DomainEvent::AccountCreated(e) => e.account_id,
            DomainEvent::CreditsGranted(e) => e.account_id,
            DomainEvent::CreditsReserved(e) => e.account_id,
            DomainEvent::CreditsCaptured(e) => e.account_id,
            DomainEvent::CreditsReleased(e) => e.account_id,
            DomainEvent::CreditsRevoked(e) => e.account_id,
            DomainEvent::CreditsExpired(e) => e.account_id,
        }
    }
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
