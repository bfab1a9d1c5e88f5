//! Stripe: the mirror of verified events, and what each event means for the
//! ledger and the billing projection.
//!
//! Processing is idempotent per event (the mirror row is locked and marked
//! in the same transaction as the effects) and per Stripe object (every
//! effect carries a key derived from the object, and states carry the time
//! they describe), so any number of duplicates in any order converge.
//! Payloads are read tolerantly, field by field: an event that async-stripe's
//! typed parser could not read is still processed when the fields it needs
//! are there.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Error;
use crate::affiliates;
use crate::catalog::{
    BillingStatusChanged, CheckoutPaymentFailed, DomainEvent, EventType, GrantSource, Metadata,
    StripeCustomerLinked, StripeEventReceived, StripeSource, SubscriptionStateChanged,
    stripe_received_event_id,
};
use crate::credits::{self, Grant};
use crate::store::{self, ExpectedVersion, NewEvent};

/// A verified event as it arrived, ready for the mirror.
#[derive(Debug, Clone)]
pub struct IncomingEvent {
    pub stripe_event_id: String,
    pub event_type: String,
    pub api_version: Option<String>,
    pub livemode: bool,
    /// The event names a connected account (`account`, Stripe Connect): not
    /// this account's own.
    pub connected_account: bool,
    pub created: DateTime<Utc>,
    pub object_id: Option<String>,
    /// `data.object.payment_intent`, for charges and disputes.
    pub payment_intent: Option<String>,
    /// The exact bytes received.
    pub raw: String,
    pub parse_error: Option<String>,
}

impl IncomingEvent {
    /// Read the envelope fields of a Stripe event. `None` when the body is
    /// not a Stripe event at all (no id, type, created or livemode).
    ///
    /// Only the envelope and `data.object`'s `id` and `payment_intent` are
    /// read (borrowed where the text has no escapes); everything else is
    /// skipped without building a tree of the body.
    pub fn from_raw(raw: &str, parse_error: Option<String>) -> Option<Self> {
        use std::borrow::Cow;
        #[derive(serde::Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            id: Cow<'a, str>,
            #[serde(borrow)]
            object: Cow<'a, str>,
            #[serde(rename = "type", borrow)]
            event_type: Cow<'a, str>,
            #[serde(default, borrow)]
            api_version: Option<Cow<'a, str>>,
            livemode: bool,
            created: i64,
            #[serde(default, borrow)]
            account: Option<Cow<'a, str>>,
            #[serde(default)]
            data: Option<Data>,
        }
        #[derive(serde::Deserialize)]
        struct Data {
            #[serde(default)]
            object: Option<Object>,
        }
        #[derive(serde::Deserialize)]
        struct Object {
            #[serde(default)]
            id: Option<Value>,
            #[serde(default)]
            payment_intent: Option<Value>,
        }
        let e: Envelope = serde_json::from_str(raw).ok()?;
        // Stripe's events are of this century; PostgreSQL refuses some times
        // chrono takes.
        if !e.id.starts_with("evt_")
            || e.object != "event"
            || !(0..=10_000_000_000).contains(&e.created)
        {
            return None;
        }
        let object = e.data.and_then(|d| d.object);
        let object = object.as_ref();
        Some(Self {
            stripe_event_id: e.id.into_owned(),
            event_type: e.event_type.into_owned(),
            api_version: e.api_version.map(Cow::into_owned),
            livemode: e.livemode,
            connected_account: e.account.is_some(),
            created: Utc.timestamp_opt(e.created, 0).single()?,
            object_id: object
                .and_then(|o| o.id.as_ref())
                .and_then(Value::as_str)
                .map(str::to_owned),
            payment_intent: object
                .and_then(|o| o.payment_intent.as_ref())
                .and_then(|p| id_of(p, ""))
                .map(str::to_owned),
            raw: raw.to_owned(),
            parse_error,
        })
    }
}

/// The job that processes a newly mirrored event, enqueued by
/// [`ingest_many`] in the same statement (the queue's own format: apalis-postgres).
pub struct ProcessingJobs<'a> {
    pub queue: &'a str,
    pub max_attempts: i32,
    /// A fresh job id (a ULID, as apalis-postgres makes them).
    pub new_id: &'a (dyn Fn() -> String + Sync),
    /// The job's payload for an event.
    pub payload: &'a (dyn Fn(&IncomingEvent) -> Vec<u8> + Sync),
}

/// Mirror verified deliveries, append `StripeEventReceived` for each event
/// mirrored for the first time and enqueue its processing job, with one
/// statement (`slate_stripe_ingest`): on a pool it commits on its own, on a
/// connection inside a transaction it is part of it. Returns, per delivery,
/// whether it was the first delivery of its event; when the same event is
/// delivered more than once here, the first of them is, and the mirror counts
/// every one. A duplicate only counts the delivery.
pub async fn ingest_many<'c, E>(
    conn: E,
    deliveries: &[(&IncomingEvent, StripeSource)],
    jobs: &ProcessingJobs<'_>,
) -> Result<Vec<bool>, Error>
where
    E: sqlx::PgExecutor<'c>,
{
    if deliveries.is_empty() {
        return Ok(Vec::new());
    }
    // One row per event, in id order (concurrent batches lock mirror rows in
    // the same order), counting every delivery of it.
    let mut unique: Vec<(usize, i32)> = Vec::new();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for (i, (e, _)) in deliveries.iter().enumerate() {
        match by_id.get(e.stripe_event_id.as_str()) {
            Some(&u) => unique[u].1 += 1,
            None => {
                by_id.insert(&e.stripe_event_id, unique.len());
                unique.push((i, 1));
            }
        }
    }
    unique.sort_by(|a, b| {
        deliveries[a.0]
            .0
            .stripe_event_id
            .cmp(&deliveries[b.0].0.stripe_event_id)
    });
    let rows: Vec<(&IncomingEvent, StripeSource)> =
        unique.iter().map(|&(i, _)| deliveries[i]).collect();
    // One array per column of `rows`.
    fn column<'r, T>(
        rows: &[(&'r IncomingEvent, StripeSource)],
        f: impl Fn(&'r IncomingEvent, StripeSource) -> T,
    ) -> Vec<T> {
        rows.iter().map(|&(e, s)| f(e, s)).collect()
    }
    let first: Vec<(String, bool)> = sqlx::query_as(
        "select mirrored_id, is_first from slate_stripe_ingest($1, $2, $3, $4, $5, $6, $7, $8,
            $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
    )
    .bind(column(&rows, |e, _| e.stripe_event_id.as_str()))
    .bind(column(&rows, |e, _| e.event_type.as_str()))
    .bind(column(&rows, |e, _| e.api_version.as_deref()))
    .bind(column(&rows, |e, _| e.livemode))
    .bind(column(&rows, |e, _| e.created))
    .bind(column(&rows, |e, _| e.object_id.as_deref()))
    .bind(column(&rows, |e, _| e.raw.as_str()))
    .bind(column(&rows, |_, s| s.as_str()))
    .bind(column(&rows, |e, _| e.parse_error.is_none()))
    .bind(column(&rows, |e, _| e.parse_error.as_deref()))
    .bind(column(&rows, |e, _| e.payment_intent.as_deref()))
    .bind(unique.iter().map(|&(_, n)| n).collect::<Vec<_>>())
    .bind(column(&rows, |e, _| {
        stripe_received_event_id(&e.stripe_event_id)
    }))
    .bind(StripeEventReceived::NAME)
    .bind(StripeEventReceived::VERSION)
    .bind(column(&rows, |e, source| {
        DomainEvent::StripeEventReceived(StripeEventReceived {
            stripe_event_id: e.stripe_event_id.clone(),
            stripe_event_type: e.event_type.clone(),
            created: e.created,
            livemode: e.livemode,
            source,
            parsed: e.parse_error.is_none(),
        })
        .payload()
    }))
    .bind(vec![
        Metadata::by(crate::Actor::Stripe).to_json();
        rows.len()
    ])
    .bind(jobs.queue)
    .bind(column(&rows, |_, _| (jobs.new_id)()))
    .bind(column(&rows, |e, _| (jobs.payload)(e)))
    .bind(jobs.max_attempts)
    .fetch_all(conn)
    .await?;
    let first_ids: std::collections::HashSet<&str> = first
        .iter()
        .filter(|(_, first)| *first)
        .map(|(id, _)| id.as_str())
        .collect();
    // The first delivery of each newly mirrored event is its first.
    let mut seen = std::collections::HashSet::new();
    Ok(deliveries
        .iter()
        .map(|(e, _)| {
            first_ids.contains(e.stripe_event_id.as_str())
                && seen.insert(e.stripe_event_id.as_str())
        })
        .collect())
}

/// The arithmetic processing does on a mirrored event's own numbers before
/// its first query (credits of a checkout or an invoice, a commission, a
/// refund's share), through the same functions as [`process`]. Reading
/// fields is plain JSON lookups; these are where a number from Stripe could
/// overflow. For the fuzz targets (fuzz/webhook_body, `scripts/fuzz`); an
/// error is one processing would fail the event with.
#[doc(hidden)]
pub fn read_mirrored(
    raw: &str,
    event_type: &str,
    catalog: &StripeCatalog,
) -> Result<(), ProcessError> {
    let payload: Value = serde_json::from_str(raw)
        .map_err(|_| ProcessError::Permanent("mirrored body is not JSON".into()))?;
    let o = payload.pointer("/data/object").unwrap_or(&Value::Null);
    let commission = |field| int(o, field).map(|paid| affiliates::commission(paid, 10_000));
    match event_type {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            std::hint::black_box((checkout_credits(catalog, o), commission("/amount_total")));
        }
        "invoice.paid" => {
            std::hint::black_box((
                invoice_plan_credits(catalog, carried_lines(o))?,
                commission("/amount_paid"),
            ));
        }
        "charge.refunded" => {
            if let Some(amount) = int(o, "/amount").filter(|a| *a > 0) {
                let refunded = int(o, "/amount_refunded").unwrap_or(0).clamp(0, amount);
                std::hint::black_box(refund_share(i64::MAX, refunded, amount));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Credits per Stripe price: one-off packs and subscription plans.
#[derive(Debug, Clone, Default)]
pub struct StripeCatalog {
    pub packs: HashMap<String, i64>,
    pub plans: HashMap<String, i64>,
}

impl StripeCatalog {
    /// Parse `price_a=500,price_b=1200`.
    pub fn parse_prices(s: &str) -> Result<HashMap<String, i64>, Error> {
        let mut out = HashMap::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (price, credits) = pair.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!("expected price=credits, got {pair:?}"))
            })?;
            let credits: i64 = credits
                .trim()
                .parse()
                .ok()
                .filter(|c| *c > 0)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("credits of {price} must be a positive integer"))
                })?;
            out.insert(price.trim().to_owned(), credits);
        }
        Ok(out)
    }
}

/// What processing did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It had an effect (or confirmed one already in place).
    Processed(String),
    /// Nothing for Slate to do with this type or object.
    Ignored(String),
    /// Already processed earlier; not run again (without `force`).
    AlreadyDone(String),
}

impl Outcome {
    pub fn describe(&self) -> &str {
        match self {
            Outcome::Processed(s) | Outcome::Ignored(s) | Outcome::AlreadyDone(s) => s,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Worth retrying later (a customer not linked yet, a database hiccup).
    #[error("retryable: {0}")]
    Retryable(String),
    /// The event cannot be processed as it is.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<Error> for ProcessError {
    fn from(e: Error) -> Self {
        match e {
            Error::Database(_) | Error::Conflict { .. } => ProcessError::Retryable(e.to_string()),
            other => ProcessError::Permanent(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for ProcessError {
    fn from(e: sqlx::Error) -> Self {
        Error::from(e).into()
    }
}

/// Fields of Stripe objects that describe a person, wherever they appear:
/// every string inside them is redacted.
const PERSONAL: &[&str] = &[
    "email",
    "name",
    "phone",
    "address",
    "receipt_email",
    "customer_email",
    "customer_name",
    "customer_phone",
    "customer_address",
    "shipping",
    "shipping_details",
    "billing_details",
    // A card's last digits and fingerprint (which follows the card from
    // account to account).
    "last4",
    "fingerprint",
    // Pages Stripe hosts, which show the customer's details to whoever
    // has the link.
    "receipt_url",
    "hosted_invoice_url",
    "invoice_pdf",
    // A dispute's evidence.
    "customer_email_address",
    "customer_purchase_ip",
    "billing_address",
    "shipping_address",
    "shipping_tracking_number",
    "access_activity_log",
    "uncategorized_text",
    // Where a mandate was accepted (`customer_acceptance.online`).
    "ip_address",
    "user_agent",
    // A tax id's verified holder.
    "verified_name",
    "verified_address",
];

/// Lists of tax ids (`{type, value}`, or tax id objects): their values are
/// redacted, their types kept (Stripe's parser reads a type it does not
/// know as an error).
const TAX_IDS: &[&str] = &["customer_tax_ids", "tax_ids"];

fn redact(v: &mut Value, personal: bool) -> bool {
    match v {
        Value::String(s) if personal && s != "[redacted]" => {
            *s = "[redacted]".into();
            true
        }
        Value::Object(map) => {
            // A tax id object (`customer.tax_id.*` events' own object too).
            let tax_id = map.get("object").and_then(Value::as_str) == Some("tax_id");
            let mut changed = false;
            for (k, val) in map.iter_mut() {
                let k = k.as_str();
                changed |= if TAX_IDS.contains(&k) {
                    redact_tax_ids(val)
                } else {
                    redact(
                        val,
                        personal || PERSONAL.contains(&k) || (tax_id && k == "value"),
                    )
                };
            }
            changed
        }
        Value::Array(items) => items.iter_mut().fold(false, |c, i| redact(i, personal) | c),
        _ => false,
    }
}

/// A list of tax ids, or a Stripe list object of them (`data`): each one's
/// value, and whatever else in it is personal.
fn redact_tax_ids(v: &mut Value) -> bool {
    let items = match v {
        Value::Array(items) => items,
        Value::Object(list) => match list.get_mut("data") {
            Some(Value::Array(items)) => items,
            _ => return false,
        },
        _ => return false,
    };
    items.iter_mut().fold(false, |c, item| {
        let value = item
            .get_mut("value")
            .is_some_and(|value| redact(value, true));
        (value | redact(item, false)) | c
    })
}

/// The ids a mirrored event names (`stripe_events.refs`), for a purge to
/// find the event by an index look-up: every string that is an id of a kind
/// a purge looks for ([`is_ref`]) and every UUID inside a string (an account
/// id, in metadata or a checkout's reference), sorted, each once. They are
/// read from the body as [`redact`] leaves it, so nothing personal is kept
/// (a name can look like an id); object keys, which are field names, are
/// not read.
pub fn refs_of(payload: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => {
                if is_ref(s) {
                    out.push(s.clone());
                }
                uuids_in(s, out);
            }
            Value::Object(map) => map.values().for_each(|v| walk(v, out)),
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut redacted = payload.clone();
    redact(&mut redacted, false);
    let mut out = Vec::new();
    walk(&redacted, &mut out);
    sorted(out)
}

/// [`refs_of`] for a body that is not JSON (which the purge drops whole):
/// every quoted token that is an id of a kind kept, and every UUID in it,
/// whatever field holds them: what a scan of its text for the needles
/// would find.
fn refs_of_text(raw: &str) -> Vec<String> {
    let mut out: Vec<String> = raw
        .split('"')
        .filter(|t| is_ref(t))
        .map(str::to_owned)
        .collect();
    uuids_in(raw, &mut out);
    sorted(out)
}

fn sorted(mut refs: Vec<String>) -> Vec<String> {
    refs.sort_unstable();
    refs.dedup();
    refs
}

/// The kinds of Stripe ids a purge looks for: its account's customers, and
/// what its credit purchases are filed under (a payment intent, else the
/// checkout session or the invoice). Only these go into `refs` (all of an
/// event's ids made its index three times the size: about 11 a body).
const REF_PREFIXES: &[&str] = &["cus_", "pi_", "cs_", "in_"];

/// Whether `s` is a Stripe id of a kind [`refs_of`] keeps: one of
/// [`REF_PREFIXES`], then letters, digits and underscores. Adding a kind
/// needs a migration that sets `refs` to null again (rows mapped before
/// would not hold it, and the purge would take the kind as indexed).
/// A payment intent's client secret (`pi_…_secret_…`) has the shape too,
/// and is left out.
fn is_ref(s: &str) -> bool {
    (4..=255).contains(&s.len())
        && REF_PREFIXES.iter().any(|p| s.starts_with(p))
        && is_id_shaped(s)
        && !s.contains("_secret_")
}

/// Letters, digits and underscores only: what a Stripe id is made of.
fn is_id_shaped(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Every UUID (8-4-4-4-12 hex digits) inside `s`, in lower case.
fn uuids_in(s: &str, out: &mut Vec<String>) {
    let b = s.as_bytes();
    let mut i = 0;
    while i + 36 <= b.len() {
        let w = &b[i..i + 36];
        let is_uuid = w.iter().enumerate().all(|(j, c)| match j {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        });
        if is_uuid {
            out.push(String::from_utf8_lossy(w).to_ascii_lowercase());
            i += 36;
        } else {
            i += 1;
        }
    }
}

/// A purge's needles from its account's customers and purchases: the ids
/// [`refs_of`] holds, and LIKE patterns for Stripe ids of other kinds (a
/// purchase filed under some other object), looked for in every body:
/// slow, never missed. What is not shaped like a Stripe id is Slate's own
/// (a purchase's `<dispute>:restored`, `<bucket>:refund-returned`), in no
/// body: left out.
fn needles(found: Vec<String>) -> (Vec<String>, Vec<String>) {
    let (ids, other): (Vec<String>, Vec<String>) = found
        .into_iter()
        .filter(|id| is_id_shaped(id))
        .partition(|id| is_ref(id));
    (ids, other.iter().map(|id| like_needle(id)).collect())
}

/// A LIKE pattern for `id` as a whole JSON string, for the rows whose
/// [`refs_of`] are not written yet.
fn like_needle(id: &str) -> String {
    format!("%\"{}\"%", id.replace('_', r"\_"))
}

/// For a purge: in the mirrored Stripe events of the account (its
/// customers', its credit purchases', or naming it), replace names, emails,
/// phones, addresses, card digits, tax ids and links to Stripe's hosted
/// receipts and invoices with "[redacted]" (strings stay strings, so the
/// typed parser still reads them; ids, amounts and metadata stay, so a
/// replay decides the same). Events processed after the purge are
/// redacted as they are processed. The events are found by the ids they
/// name ([`refs_of`], an index look-up), and those not mapped yet by a scan
/// of their bodies, which maps them.
/// Returns how many mirrored events were redacted.
pub async fn redact_personal_details(
    conn: &mut PgConnection,
    account_id: Uuid,
) -> Result<u64, Error> {
    // Its customers, and the payments that bought it credits (a dispute
    // names its charge and payment intent, not the customer).
    let found: Vec<String> = sqlx::query_scalar(
        "select customer_id from stripe_customers where account_id = $1
         union
         select stripe_object from credit_buckets
          where account_id = $1 and stripe_object is not null and source in ('purchase', 'subscription')",
    )
    .bind(account_id)
    .fetch_all(&mut *conn)
    .await?;
    let (mut ids, unmapped_kinds) = needles(found);
    // Rows not mapped yet (`refs` null: written before it existed and not
    // reached by the sweep yet, or waiting for their processing) are
    // scanned for the ids, and for the account's id anywhere in them.
    let mut patterns: Vec<String> = ids.iter().map(|id| like_needle(id)).collect();
    patterns.push(format!("%{account_id}%"));
    if !unmapped_kinds.is_empty() {
        tracing::warn!(
            ids = unmapped_kinds.len(),
            "the purge scans the whole Stripe mirror for ids of a kind it does not index"
        );
    }
    ids.push(account_id.to_string());
    let everywhere = if unmapped_kinds.is_empty() {
        ""
    } else {
        " or raw like any($3)"
    };
    let mut find = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select stripe_event_id, raw, refs is null from stripe_events
          where refs && $1 or (refs is null and raw like any($2)){everywhere}
          order by stripe_event_id
            for update"
    )))
    .bind(&ids)
    .bind(&patterns);
    if !unmapped_kinds.is_empty() {
        find = find.bind(&unmapped_kinds);
    }
    let rows: Vec<(String, String, bool)> = find.fetch_all(&mut *conn).await?;
    let mut changed = 0;
    for (id, raw, unmapped) in rows {
        // Unreadable JSON cannot be redacted field by field: drop it whole.
        let mut v = serde_json::from_str::<Value>(&raw).unwrap_or(Value::Null);
        let redacted = v.is_null() || v.get_mut("data").is_some_and(|d| redact(d, false));
        if redacted || unmapped {
            let body = if v.is_null() {
                "{}".to_owned()
            } else {
                v.to_string()
            };
            sqlx::query("update stripe_events set raw = $2, refs = $3 where stripe_event_id = $1")
                .bind(&id)
                .bind(&body)
                .bind(refs_of(&v))
                .execute(&mut *conn)
                .await?;
        }
        changed += u64::from(redacted);
    }
    Ok(changed)
}

/// Write [`refs_of`] for up to `limit` mirrored events that have none yet
/// (written before `refs` existed, or whose processing failed before it
/// wrote them), oldest first; returns how many were read (each has refs
/// after). Events waiting for their processing are left to it: it writes
/// them in the update it makes anyway, and a backlog of them (an outage, a
/// burst) would otherwise take each sweep's whole budget, written twice
/// and locked against the processing. A body that is not JSON is read as
/// text ([`refs_of_text`]).
pub async fn map_unmapped(pool: &PgPool, limit: i64) -> Result<u64, sqlx::Error> {
    // Read without locks (no transaction id is held while the bodies are
    // parsed); a row whose body changed meanwhile has its refs written by
    // whoever changed it, and is left alone below.
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select stripe_event_id, raw from stripe_events where refs is null and status <> 'pending'
          order by received_at limit $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    // Ids hold no spaces: each row's refs go as one space-separated string.
    let (ids, refs): (Vec<&str>, Vec<String>) = rows
        .iter()
        .map(|(id, raw)| {
            let refs = match serde_json::from_str::<Value>(raw) {
                Ok(v) => refs_of(&v),
                Err(_) => refs_of_text(raw),
            };
            (id.as_str(), refs.join(" "))
        })
        .unzip();
    sqlx::query(
        "update stripe_events s set refs = string_to_array(r.refs, ' ')
           from unnest($1::text[], $2::text[]) as r(id, refs)
          where s.stripe_event_id = r.id and s.refs is null",
    )
    .bind(&ids)
    .bind(&refs)
    .execute(pool)
    .await?;
    Ok(rows.len() as u64)
}

/// True when the mirror holds this Stripe event.
pub async fn is_mirrored(
    db: impl sqlx::PgExecutor<'_>,
    stripe_event_id: &str,
) -> Result<bool, Error> {
    Ok(
        sqlx::query_scalar("select exists(select 1 from stripe_events where stripe_event_id = $1)")
            .bind(stripe_event_id)
            .fetch_one(db)
            .await?,
    )
}

/// Process one mirrored event: its effects and its new mirror status commit
/// together. `force` re-runs an event already processed (replay); its
/// effects are keyed, so that changes nothing that was already done.
pub async fn process(
    pool: &PgPool,
    catalog: &StripeCatalog,
    stripe_event_id: &str,
    force: bool,
) -> Result<Outcome, ProcessError> {
    let options = ProcessOptions {
        force,
        ..Default::default()
    };
    process_with(pool, catalog, stripe_event_id, &options).await
}

/// What processing asks Stripe's API for, where an event alone cannot
/// tell: two states of one subscription in the same second, an invoice's
/// payments or the lines its event did not carry, a charge's refunds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refetch {
    /// An object by id, as it is now: a subscription; an invoice with its
    /// payments; a charge with its refunds.
    Object(String),
    /// A page of an invoice's lines (`GET /v1/invoices/{id}/lines`, 100 at
    /// most), after the line `starting_after`.
    InvoiceLines {
        invoice: String,
        starting_after: Option<String>,
    },
}

/// Asks Stripe's API (see [`Refetch`]); the answer as JSON, `None` when
/// Stripe did not answer with one.
pub type Refetcher = std::sync::Arc<
    dyn Fn(Refetch) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Value>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone, Default)]
pub struct ProcessOptions {
    pub force: bool,
    /// Ask Stripe when in doubt (None: a deterministic tie-break instead).
    pub refetch: Option<Refetcher>,
    /// Fault injection for crash tests: wait this long after the effects,
    /// before the commit (`SLATE_FAULT_STRIPE_HOLD_MS` in `slate work`).
    pub hold_before_commit: Option<std::time::Duration>,
}

/// What a processing has read from Stripe, kept across its rounds.
///
/// Processing never waits for Stripe inside its transaction: the mirror
/// row's lock gives that transaction an id, and a transaction id held open
/// holds back every asynchronous projector (their gap-safe reads wait for
/// it), for as long as Stripe takes to answer, up to its timeout, page after
/// page of an invoice's lines. A read the processing has not made yet ends
/// the round instead (rolled back, nothing written); [`process_with`] makes
/// the read with no transaction open and starts the round again with the
/// answer at hand. Each request is made once per processing.
#[derive(Default)]
struct Reads {
    answers: std::sync::Mutex<Vec<(Refetch, Option<Value>)>>,
    /// The read that ended the last round.
    wanted: std::sync::Mutex<Option<Refetch>>,
}

impl Reads {
    /// Stripe's answer to `request` (`None` when Stripe did not answer with
    /// JSON), or the end of this round until it has been asked.
    fn get(&self, request: Refetch) -> Result<Option<Value>, ProcessError> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, answer)) = answers.iter().find(|(asked, _)| *asked == request) {
            return Ok(answer.clone());
        }
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = Some(request);
        Err(ProcessError::Retryable(
            "Stripe was not asked yet (a round of processing ended to ask it)".into(),
        ))
    }

    fn take_wanted(&self) -> Option<Refetch> {
        self.wanted.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn answer(&self, request: Refetch, answer: Option<Value>) {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((request, answer));
    }
}

/// Reads from Stripe one processing makes at most: an invoice's payments,
/// its pages of lines, a subscription, the charges of a payment's refunds
/// and disputes settled with its grant. Past it the event fails for good
/// (a retry would start again with none), to be replayed.
const READS: usize = INVOICE_LINE_PAGES + 50;

/// The page of an invoice's lines after `page`, the answer to `asked`, when
/// there is one: read with it, before the round that needs it, so that an
/// invoice of many pages is not a round per page.
fn next_lines_page(asked: &Refetch, page: Option<&Value>) -> Option<Refetch> {
    let Refetch::InvoiceLines {
        invoice,
        starting_after,
    } = asked
    else {
        return None;
    };
    let last = goes_on_from(page?, starting_after.as_deref())?;
    Some(Refetch::InvoiceLines {
        invoice: invoice.clone(),
        starting_after: Some(last.to_owned()),
    })
}

/// Where a page of one of Stripe's lists goes on from: its last item's id,
/// when Stripe says the list goes on (`has_more`) and that id is not where
/// the page began (`after`). A list that goes on names where it goes on
/// from; `None` otherwise.
fn goes_on_from<'p>(page: &'p Value, after: Option<&str>) -> Option<&'p str> {
    let last = page
        .pointer("/data")
        .and_then(Value::as_array)?
        .last()
        .and_then(|l| text(l, "/id"))?;
    (bool_at(page, "/has_more") == Some(true) && Some(last) != after).then_some(last)
}

pub async fn process_with(
    pool: &PgPool,
    catalog: &StripeCatalog,
    stripe_event_id: &str,
    options: &ProcessOptions,
) -> Result<Outcome, ProcessError> {
    let reads = Reads::default();
    let mut made = 0;
    let mut result = process_in_tx(pool, catalog, stripe_event_id, options, &reads).await;
    while let (Err(_), Some(refetch), Some(wanted)) =
        (&result, options.refetch.as_ref(), reads.take_wanted())
    {
        if made >= READS {
            result = Err(ProcessError::Permanent(format!(
                "processing needs more than {READS} reads from Stripe"
            )));
            break;
        }
        // The read wanted, and the pages of lines after it (as many as
        // `invoice_lines` reads at most).
        let (mut next, mut pages) = (Some(wanted), 0);
        while let Some(request) = next.take() {
            let answer = refetch(request.clone()).await;
            made += 1;
            pages += usize::from(matches!(request, Refetch::InvoiceLines { .. }));
            next = next_lines_page(&request, answer.as_ref())
                .filter(|_| made < READS && pages < INVOICE_LINE_PAGES);
            reads.answer(request, answer);
        }
        result = process_in_tx(pool, catalog, stripe_event_id, options, &reads).await;
    }
    if let Err(e) = &result {
        mark_failed(pool, stripe_event_id, &e.to_string()).await?;
    }
    result
}

/// Record that processing mirrored event `id` failed (`error`, its first
/// 500 characters), unless another processing finished it meanwhile: the
/// failure is written after its transaction rolled back, and a replay or a
/// second job may have been waiting on the row and processed it since.
pub async fn mark_failed(pool: &PgPool, id: &str, error: &str) -> Result<(), sqlx::Error> {
    let message: String = error.chars().take(500).collect();
    sqlx::query(
        "update stripe_events set status = 'failed', attempts = attempts + 1, last_error = $2
          where stripe_event_id = $1 and status not in ('processed', 'ignored')",
    )
    .bind(id)
    .bind(message)
    .execute(pool)
    .await?;
    // Failed or not, an event about a purged account is redacted.
    if let Err(e) = redact_if_purged(pool, id).await {
        tracing::warn!(error = %e, "could not redact a failed event of a purged account");
    }
    Ok(())
}

/// Redact mirrored event `id` if it is about an account that was purged
/// ([`of_purged_account`]), and write its [`refs_of`]; what a processing
/// does as it ends, for an event whose processing failed.
async fn redact_if_purged(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let raw: Option<String> =
        sqlx::query_scalar("select raw from stripe_events where stripe_event_id = $1 for update")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(Ok(mut payload)) = raw.map(|r| serde_json::from_str::<Value>(&r)) else {
        return Ok(());
    };
    let redacted = redact_if_purged_body(&mut tx, &mut payload).await?;
    sqlx::query(
        "update stripe_events set raw = coalesce($2, raw), refs = $3 where stripe_event_id = $1",
    )
    .bind(id)
    .bind(redacted.then(|| payload.to_string()))
    .bind(refs_of(&payload))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Redact a mirrored event's body if it is about an account that was
/// purged ([`of_purged_account`]); true if anything was left to redact.
async fn redact_if_purged_body(
    conn: &mut PgConnection,
    payload: &mut Value,
) -> Result<bool, sqlx::Error> {
    let object = payload.pointer("/data/object").unwrap_or(&Value::Null);
    Ok(of_purged_account(conn, object).await?
        && payload.get_mut("data").is_some_and(|d| redact(d, false)))
}

async fn process_in_tx(
    pool: &PgPool,
    catalog: &StripeCatalog,
    id: &str,
    options: &ProcessOptions,
    reads: &Reads,
) -> Result<Outcome, ProcessError> {
    let force = options.force;
    let refetch = options.refetch.as_ref().map(|_| reads);
    let mut tx = pool.begin().await?;
    let row: Option<MirrorRow> = sqlx::query_as(
        "select raw, event_type, status, object_id, created, processed_at from stripe_events
          where stripe_event_id = $1 for update",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(MirrorRow {
        raw,
        event_type,
        status,
        object_id,
        created,
        processed_at,
    }) = row
    else {
        return Err(ProcessError::Permanent(format!(
            "{id} is not in the mirror"
        )));
    };
    if !force && (status == "processed" || status == "ignored") {
        return Ok(Outcome::AlreadyDone(status));
    }
    let mut payload: Value = serde_json::from_str(&raw)
        .map_err(|_| ProcessError::Permanent("mirrored body is not JSON".into()))?;
    let mut object = payload
        .pointer("/data/object")
        .cloned()
        .unwrap_or(Value::Null);
    // An invoice's payment intent is where a refund or a dispute of its
    // payment finds the grant. Stripe's events of API versions since
    // 2025-03-31 do not carry its payments (an includable field): where
    // Stripe can be asked, the invoice is read with them, and the event is
    // tried again later when that fails. (Where it cannot, the grant is
    // filed under the invoice's id, and a refund of it finds nothing.)
    if matches!(
        event_type.as_str(),
        "invoice.paid" | "invoice.payment_failed"
    ) && invoice_payment_intent(&object).is_none()
        && let Some(reads) = refetch
        && let Some(invoice) = text(&object, "/id").map(str::to_owned)
    {
        match reads.get(Refetch::Object(invoice.clone()))? {
            Some(fresh) if fresh.pointer("/payments/data").is_some() => {
                object["payments"] = fresh["payments"].clone();
            }
            _ => {
                return Err(ProcessError::Retryable(format!(
                    "{invoice}: its payments could not be read from Stripe"
                )));
            }
        }
    }
    // One event per Stripe object at a time, and one per payment: a purchase
    // and a refund or dispute of it are different objects, and each reads
    // what the other writes (the refund looks for the grant; the grant, in
    // `settle_payment`, for refunds and disputes that came first). Run side
    // by side, each could miss the other and the refund would be lost. Both
    // locks in one statement, the object's first (in array order), before
    // any account's lock, in every path (no lock-order cycle).
    let locks: Vec<String> = object_id
        .iter()
        .map(|o| format!("stripe-object:{o}"))
        .chain(payment_of(&event_type, &object).map(|p| format!("stripe-payment:{p}")))
        .collect();
    if !locks.is_empty() {
        sqlx::query("select pg_advisory_xact_lock(hashtext(k)) from unnest($1::text[]) as k")
            .bind(&locks)
            .execute(&mut *tx)
            .await?;
    }
    let cx = Cx {
        catalog,
        event_id: id,
        created,
        meta: Metadata::stripe_effect(id),
        refetch,
    };
    // A connected account's event (Stripe Connect) is not this account's:
    // the webhook refuses it, and one mirrored before it did, or listed by
    // a reconcile, changes nothing here either.
    let connected = payload.get("account").is_some_and(|a| !a.is_null());
    let outcome = match event_type.as_str() {
        _ if connected => Outcome::Ignored("a connected account's event".into()),
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            checkout_paid(&mut tx, &cx, &object).await?
        }
        "checkout.session.async_payment_failed" => checkout_failed(&mut tx, &cx, &object).await?,
        "invoice.paid" => invoice_paid(&mut tx, &cx, &object).await?,
        "invoice.payment_failed" => invoice_failed(&mut tx, &cx, &object).await?,
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => subscription_changed(&mut tx, &cx, &object).await?,
        "charge.refunded" => charge_refunded(&mut tx, &cx, &object).await?,
        t if REFUND_EVENTS.contains(&t) => refund_changed(&mut tx, &cx, &object).await?,
        "charge.dispute.created" | "charge.dispute.updated" | "charge.dispute.closed" => {
            dispute_changed(&mut tx, &cx, &object).await?
        }
        other => Outcome::Ignored(format!("{other} is not handled")),
    };
    let status = match &outcome {
        Outcome::Ignored(_) => "ignored",
        _ => "processed",
    };
    if processed_at.is_some() {
        retire_earlier_processing(&mut tx, id).await?;
    }
    // Stamped when the work is done, not when the transaction began (after
    // waiting on the locks above, say): the lag fold stays a margin behind
    // the clock, and a stamp older than that when it commits would never be
    // counted.
    // An event about an account already purged (a late refund or dispute,
    // the subscription's end the purge itself caused) is redacted as the
    // purge redacted the ones before it.
    let redacted = redact_if_purged_body(&mut tx, &mut payload).await?;
    sqlx::query(
        "update stripe_events
            set status = $2, outcome = $3, attempts = attempts + 1, last_error = null,
                processed_at = clock_timestamp(), raw = coalesce($4, raw), refs = $5
          where stripe_event_id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(outcome.describe())
    .bind(redacted.then(|| payload.to_string()))
    .bind(refs_of(&payload))
    .execute(&mut *tx)
    .await?;
    if let Some(hold) = options.hold_before_commit {
        tracing::warn!(
            hold_ms = hold.as_millis() as u64,
            "fault injection: holding before commit"
        );
        tokio::time::sleep(hold).await;
    }
    tx.commit().await?;
    Ok(outcome)
}

/// Whether a mirrored event's object is about an account that was purged:
/// by its customer, by a payment that bought the account credits (a
/// refund's or a dispute's charge and payment intent), or by the account
/// its metadata or checkout names. The same links the purge's own
/// redaction follows ([`redact_personal_details`]).
async fn of_purged_account(conn: &mut PgConnection, object: &Value) -> Result<bool, sqlx::Error> {
    let ids: Vec<&str> = ["/id", "/customer", "/charge", "/payment_intent", "/invoice"]
        .iter()
        .filter_map(|p| id_of(object, p))
        .chain(invoice_payment_intent(object))
        .collect();
    let accounts: Vec<Uuid> = [
        account_from_metadata(object),
        text(object, "/client_reference_id").and_then(|r| r.parse().ok()),
    ]
    .into_iter()
    .flatten()
    .collect();
    sqlx::query_scalar(
        "with candidates as (
             select unnest($1::uuid[]) as account_id
             union select account_id from stripe_customers where customer_id = any($2)
             union select account_id from credit_buckets
                    where stripe_object = any($2) and source in ('purchase', 'subscription'))
         select exists (select 1 from accounts a join candidates c using (account_id)
                         where a.purged_at is not null)",
    )
    .bind(&accounts)
    .bind(&ids)
    .fetch_one(conn)
    .await
}

/// A processing replaces the event's earlier one (its `processed_at`). One
/// the lag fold has not taken yet (stamped at or after its watermark) is
/// added to the folded totals here, or `/metrics`' lag histogram would lose
/// it and a bucket could go down, which Prometheus reads as a reset. The
/// watermark is held in share mode until the commit: a fold running beside
/// this one either took the earlier stamp before (and this adds nothing) or
/// sees the new one after.
async fn retire_earlier_processing(conn: &mut PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "with w as (select upto from stripe_lag_watermark for share),
              p as (select extract(epoch from e.processed_at - e.received_at)::float8 d
                      from stripe_events e, w
                     where e.stripe_event_id = $1 and e.processed_at >= w.upto)
         insert into stripe_lag_retired (le, events, seconds)
         select b.le, 1, p.d from p, unnest($2::float8[]) b(le) where p.d <= b.le
         on conflict (le) do update
            set events = stripe_lag_retired.events + excluded.events,
                seconds = stripe_lag_retired.seconds + excluded.seconds",
    )
    .bind(id)
    .bind(crate::histogram::duration_bounds())
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct MirrorRow {
    raw: String,
    event_type: String,
    status: String,
    object_id: Option<String>,
    created: DateTime<Utc>,
    processed_at: Option<DateTime<Utc>>,
}

struct Cx<'a> {
    catalog: &'a StripeCatalog,
    event_id: &'a str,
    created: DateTime<Utc>,
    meta: Metadata,
    /// Stripe's answers, where Stripe can be asked ([`Reads`]).
    refetch: Option<&'a Reads>,
}

fn text<'v>(v: &'v Value, pointer: &str) -> Option<&'v str> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The payment intent an invoice was paid with: the newer API lists it
/// under `payments` (a paid one first, where several are listed), API
/// versions before 2025-03-31 name it at the top (`payment_intent`).
fn invoice_payment_intent(inv: &Value) -> Option<&str> {
    let payments = inv.pointer("/payments/data").and_then(Value::as_array);
    let listed = |paid_only: bool| {
        payments
            .into_iter()
            .flatten()
            .filter(|p| !paid_only || text(p, "/status") == Some("paid"))
            .find_map(|p| id_of(p, "/payment/payment_intent"))
    };
    listed(true)
        .or_else(|| listed(false))
        .or_else(|| id_of(inv, "/payment_intent"))
}

/// The payment an event's effects depend on, where a grant and the refunds
/// and disputes of it meet (see `settle_payment`).
fn payment_of<'v>(event_type: &str, object: &'v Value) -> Option<&'v str> {
    match event_type {
        "invoice.paid" | "invoice.payment_failed" => invoice_payment_intent(object),
        // A refund or dispute and its charge meet at the charge when there
        // is no payment intent (the Charges API's charges).
        "charge.refunded" => id_of(object, "/payment_intent").or_else(|| text(object, "/id")),
        t if REFUND_EVENTS.contains(&t) || t.starts_with("charge.dispute.") => {
            id_of(object, "/payment_intent").or_else(|| id_of(object, "/charge"))
        }
        t if t.starts_with("checkout.session.") || t.starts_with("charge.") => {
            id_of(object, "/payment_intent")
        }
        _ => None,
    }
}

/// An expandable field: an id string or an object with an id.
fn id_of<'v>(v: &'v Value, pointer: &str) -> Option<&'v str> {
    match v.pointer(pointer)? {
        Value::String(s) if !s.is_empty() => Some(s),
        Value::Object(o) => o.get("id").and_then(Value::as_str),
        _ => None,
    }
}

fn bool_at(v: &Value, pointer: &str) -> Option<bool> {
    v.pointer(pointer).and_then(Value::as_bool)
}

fn int(v: &Value, pointer: &str) -> Option<i64> {
    match v.pointer(pointer)? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn time(v: &Value, pointer: &str) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(int(v, pointer)?, 0).single()
}

fn account_from_metadata(object: &Value) -> Option<Uuid> {
    text(object, "/metadata/slate_account_id").and_then(|s| s.parse().ok())
}

async fn account_for_customer(
    conn: &mut PgConnection,
    customer: &str,
) -> Result<Option<Uuid>, Error> {
    Ok(
        sqlx::query_scalar("select account_id from stripe_customers where customer_id = $1")
            .bind(customer)
            .fetch_optional(conn)
            .await?,
    )
}

async fn account_exists(conn: &mut PgConnection, account: Uuid) -> Result<bool, Error> {
    Ok(
        sqlx::query_scalar("select exists(select 1 from accounts where account_id = $1)")
            .bind(account)
            .fetch_one(conn)
            .await?,
    )
}

/// Link a customer to an account once (the first link stands).
async fn link_customer(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    customer: &str,
    account: Uuid,
) -> Result<(), Error> {
    let event = NewEvent {
        event_id: store::deterministic_event_id(&format!("stripe-customer-linked:{customer}")),
        event: DomainEvent::StripeCustomerLinked(StripeCustomerLinked {
            account_id: account,
            customer_id: customer.to_owned(),
        }),
        metadata: cx.meta.clone(),
    };
    store::append_and_apply(
        conn,
        &format!("stripe-customer-{customer}"),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    Ok(())
}

/// The account an object belongs to: its metadata, else its customer's link.
async fn resolve_account(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    candidates: &[Option<Uuid>],
    customer: Option<&str>,
) -> Result<Uuid, ProcessError> {
    let from_object = candidates.iter().flatten().next().copied();
    if let Some(account) = from_object {
        if !account_exists(conn, account).await? {
            return Err(ProcessError::Permanent(format!(
                "account {account} does not exist"
            )));
        }
        if let Some(customer) = customer {
            link_customer(conn, cx, customer, account).await?;
        }
        return Ok(account);
    }
    if let Some(customer) = customer
        && let Some(account) = account_for_customer(conn, customer).await?
    {
        return Ok(account);
    }
    Err(ProcessError::Retryable(
        "no account for this customer yet (waiting for its checkout session)".into(),
    ))
}

/// A checkout session's id and the account it pays for (by
/// `client_reference_id`, then metadata, then customer).
async fn checkout_session_account<'s>(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    s: &'s Value,
) -> Result<(&'s str, Uuid), ProcessError> {
    let session =
        text(s, "/id").ok_or_else(|| ProcessError::Permanent("session without id".into()))?;
    let client_ref = text(s, "/client_reference_id").and_then(|r| r.parse().ok());
    let account = resolve_account(
        conn,
        cx,
        &[client_ref, account_from_metadata(s)],
        id_of(s, "/customer"),
    )
    .await?;
    Ok((session, account))
}

/// The credits a paid checkout session buys: its `metadata.credits`, else
/// its pack's.
fn checkout_credits(catalog: &StripeCatalog, s: &Value) -> Option<i64> {
    int(s, "/metadata/credits")
        .or_else(|| text(s, "/metadata/price_id").and_then(|p| catalog.packs.get(p).copied()))
        .filter(|c| *c > 0)
}

#[cfg(test)]
mod redaction_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tax_ids_mandates_and_dispute_text_are_redacted_and_their_types_kept() {
        // A `customer.tax_id.created` event's object, an invoice's list,
        // a mandate's acceptance and a dispute's evidence.
        let mut data = json!({"object": {
            "id": "txi_1", "object": "tax_id", "type": "eu_vat", "value": "DE123456789",
            "verification": {"status": "verified", "verified_name": "Ada Lovelace GmbH",
                             "verified_address": "Berlin"},
            "customer_tax_ids": [{"type": "eu_vat", "value": "DE987654321"}],
            "customer_acceptance": {"type": "online",
                                    "online": {"ip_address": "203.0.113.9", "user_agent": "Mozilla/5.0 (Ada)"}},
            "evidence": {"access_activity_log": "logged in from Ada's laptop",
                         "uncategorized_text": "Ada says", "product_description": "credits"},
            "tax_ids": {"object": "list", "data": [{"object": "tax_id", "type": "gb_vat", "value": "GB1"}]},
        }});
        assert!(redact(&mut data, false));
        let text = data.to_string();
        for personal in [
            "DE123456789",
            "DE987654321",
            "GB1",
            "Ada",
            "203.0.113.9",
            "Berlin",
        ] {
            assert!(!text.contains(personal), "{personal} in {text}");
        }
        for kept in ["eu_vat", "gb_vat", "verified", "online", "credits", "txi_1"] {
            assert!(text.contains(kept), "{kept} gone from {text}");
        }
        assert!(!redact(&mut data, false), "nothing left to redact");
    }

    /// A tripwire: the rows mapped so far hold these kinds only, and a purge
    /// takes every kind listed as found through `refs`. Adding one without a
    /// migration that sets `refs` back to null (so that the sweep maps every
    /// row again, and the purge scans the bodies meanwhile) would make the
    /// purge miss that kind in every row mapped before.
    #[test]
    fn the_kinds_refs_holds_change_only_with_a_migration_that_maps_again() {
        assert_eq!(
            REF_PREFIXES,
            ["cus_", "pi_", "cs_", "in_"],
            "a new kind of id in refs needs a migration setting stripe_events.refs to null"
        );
    }

    #[test]
    fn an_events_refs_are_its_ids_and_account_ids_and_none_of_its_personal_details() {
        let account = "0b6c1a6e-5f4e-4f7a-9c1d-2b3a4c5d6e7f";
        let event = json!({"id": "evt_1", "type": "charge.dispute.closed", "data": {"object": {
            "id": "dp_1", "object": "dispute", "charge": "ch_1", "payment_intent": "pi_1",
            "customer": "cus_1", "invoice": "in progress",
            "status": "lost", "amount": 4900,
            "metadata": {"account_id": account.to_uppercase()},
            "description": format!("Slate credits for {account}, again {account}"),
            // Personal values shaped like ids.
            "evidence": {"customer_name": "cus_Ada", "customer_email_address": "ada_l@example.com"},
            "billing_details": {"name": "pi_Ada", "address": {"line1": "in_Main"}},
            "tax_id": {"object": "tax_id", "type": "eu_vat", "value": "cs_123"},
            "customer_tax_ids": [{"type": "eu_vat", "value": "in_987"}],
            "balance_transactions": [{"id": "txn_1", "source": "dp_1", "reporting_category": "dispute"}],
        }}});
        assert_eq!(refs_of(&event), [account, "cus_1", "pi_1"]);
        // Redacting changes none of them.
        let mut redacted = event.clone();
        assert!(redact(&mut redacted["data"], false));
        assert_eq!(refs_of(&redacted), refs_of(&event));
        // Ids inside a list of tax ids count, their values do not; nor does
        // a client secret.
        let list = json!({"data": {"object": {
            "tax_ids": {"object": "list", "data": [{"object": "tax_id", "customer": "cus_2", "value": "in_3"}]},
            "customer_tax_ids": [{"type": "eu_vat", "value": "pi_4"}],
            "client_secret": "pi_5_secret_abc",
        }}});
        assert_eq!(refs_of(&list), ["cus_2"]);
        // A body that is not JSON: its quoted ids and UUIDs, wherever.
        let broken =
            format!(r#"{{"a": "cus_9", "b": "{account} x", "c": "pi_9_secret_x", "d": [1e999"#);
        assert_eq!(refs_of_text(&broken), [account, "cus_9"]);
        // Needles: ids refs hold, patterns for Stripe ids of other kinds,
        // nothing for Slate's own composite objects.
        let (ids, scanned) = needles(vec![
            "cus_1".into(),
            "pi_1".into(),
            "ch_1".into(),
            format!("{account}:restored"),
            "b:refund-returned".into(),
        ]);
        assert_eq!(ids, ["cus_1", "pi_1"]);
        assert_eq!(scanned, [r#"%"ch\_1"%"#]);
        // A needle as a whole JSON string, its underscores literal.
        assert_eq!(like_needle("cus_a1"), r#"%"cus\_a1"%"#);
    }
}

#[cfg(test)]
mod overflow_tests {
    use super::*;

    #[test]
    fn an_invoice_whose_quantities_overflow_is_a_permanent_error_not_a_panic() {
        let catalog = StripeCatalog {
            packs: Default::default(),
            plans: StripeCatalog::parse_prices("price_pro=1000").unwrap(),
        };
        let lines = [serde_json::json!({"price": {"id": "price_pro"}, "quantity": i64::MAX})];
        assert!(matches!(
            invoice_plan_credits(&catalog, &lines),
            Err(ProcessError::Permanent(_))
        ));
        let lines = [serde_json::json!({"price": {"id": "price_pro"}, "quantity": 3})];
        assert_eq!(invoice_plan_credits(&catalog, &lines).unwrap().0, 3000);
    }
}

async fn checkout_paid(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    s: &Value,
) -> Result<Outcome, ProcessError> {
    let (session, account) = checkout_session_account(conn, cx, s).await?;
    if text(s, "/mode") == Some("subscription") {
        return Ok(Outcome::Processed(
            "subscription checkout: credits come with each paid invoice".into(),
        ));
    }
    match text(s, "/payment_status") {
        Some("paid") | Some("no_payment_required") => {}
        _ => {
            return Ok(Outcome::Processed(
                "payment pending: waiting for async_payment_succeeded".into(),
            ));
        }
    }
    let stripe_object = id_of(s, "/payment_intent").unwrap_or(session).to_owned();
    let settle = stripe_object.clone();
    let grant_key = format!("stripe:checkout:{session}");
    let out = match earlier_grant(conn, &grant_key, account).await? {
        Some(out) => out,
        None => {
            let credits = checkout_credits(cx.catalog, s).ok_or_else(|| {
                ProcessError::Permanent(
                    "checkout session names no credits (metadata.credits)".into(),
                )
            })?;
            credits::grant(
                conn,
                &Grant {
                    account_id: account,
                    amount: credits,
                    source: GrantSource::Purchase,
                    grant_key,
                    stripe_object: Some(stripe_object),
                    expires_at: None,
                    reason: text(s, "/metadata/pack").map(|p| format!("pack {p}")),
                },
                &cx.meta,
            )
            .await?
        }
    };
    // A commission is decided with the grant, once: a replay, or a later
    // processing of the session's other event, earns nothing, whatever the
    // account's referral has become since.
    let currency = text(s, "/currency").unwrap_or("usd");
    if let (true, Some(paid)) = (out.took_effect(), int(s, "/amount_total")) {
        affiliates::earn(conn, &cx.meta, account, &settle, currency, paid).await?;
    }
    settle_payment(conn, cx, &settle).await?;
    Ok(Outcome::Processed(format!(
        "{} {} credits for {session}",
        out.outcome, out.amount
    )))
}

async fn checkout_failed(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    s: &Value,
) -> Result<Outcome, ProcessError> {
    let (session, account) = checkout_session_account(conn, cx, s).await?;
    let event = NewEvent {
        event_id: store::deterministic_event_id(&format!("checkout-payment-failed:{session}")),
        event: DomainEvent::CheckoutPaymentFailed(CheckoutPaymentFailed {
            account_id: account,
            checkout_session_id: session.to_owned(),
        }),
        metadata: cx.meta.clone(),
    };
    store::append_and_apply(
        conn,
        &format!("stripe-checkout-{session}"),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    Ok(Outcome::Processed(format!(
        "payment failed for {session}; nothing granted"
    )))
}

/// The subscription an invoice is for (current API: `parent.subscription_details`).
fn invoice_subscription(inv: &Value) -> Option<&str> {
    id_of(inv, "/parent/subscription_details/subscription").or_else(|| id_of(inv, "/subscription"))
}

fn invoice_account_hint(inv: &Value) -> Option<Uuid> {
    inv.pointer("/parent/subscription_details/metadata")
        .and_then(|m| m.get("slate_account_id"))
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

/// An invoice's id and the account it bills.
async fn invoice_and_account<'v>(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    inv: &'v Value,
) -> Result<(&'v str, Uuid), ProcessError> {
    let invoice =
        text(inv, "/id").ok_or_else(|| ProcessError::Permanent("invoice without id".into()))?;
    let account = resolve_account(
        conn,
        cx,
        &[invoice_account_hint(inv), account_from_metadata(inv)],
        id_of(inv, "/customer"),
    )
    .await?;
    Ok((invoice, account))
}

/// Pages of an invoice's lines read from Stripe at most: 10,000 lines,
/// far beyond what Stripe lets an invoice have.
const INVOICE_LINE_PAGES: usize = 100;

/// An invoice's lines. An invoice in an event carries its first lines only
/// (`lines.has_more`); the rest are read from Stripe, 100 at a time. Where
/// Stripe cannot be asked (no `STRIPE_API_KEY`), such an invoice fails for
/// good, to be replayed once it can: credits counted from the first lines
/// alone would be short, and a replay keeps a grant once made.
async fn invoice_lines<'v>(
    cx: &Cx<'_>,
    inv: &'v Value,
    invoice: &str,
) -> Result<std::borrow::Cow<'v, [Value]>, ProcessError> {
    use std::borrow::Cow;
    if bool_at(inv, "/lines/has_more") != Some(true) {
        return Ok(Cow::Borrowed(carried_lines(inv)));
    }
    let Some(refetch) = cx.refetch else {
        return Err(ProcessError::Permanent(format!(
            "{invoice} has more lines than its event carries, and Stripe cannot be asked for them \
             (STRIPE_API_KEY): replay it once it can"
        )));
    };
    let unread = || {
        ProcessError::Retryable(format!(
            "{invoice}: its lines could not be read from Stripe"
        ))
    };
    let mut lines: Vec<Value> = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..INVOICE_LINE_PAGES {
        let page = refetch
            .get(Refetch::InvoiceLines {
                invoice: invoice.to_owned(),
                starting_after: after.clone(),
            })?
            .ok_or_else(unread)?;
        let data = page
            .pointer("/data")
            .and_then(Value::as_array)
            .ok_or_else(unread)?;
        lines.extend(data.iter().cloned());
        if bool_at(&page, "/has_more") == Some(false) {
            return Ok(Cow::Owned(lines));
        }
        let next = goes_on_from(&page, after.as_deref()).ok_or_else(unread)?;
        after = Some(next.to_owned());
    }
    Err(ProcessError::Permanent(format!(
        "{invoice} has more than {} lines",
        INVOICE_LINE_PAGES * 100
    )))
}

/// The lines an invoice in an event carries (its first ones).
fn carried_lines(inv: &Value) -> &[Value] {
    inv.pointer("/lines/data")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

/// The plan credits an invoice's lines pay for, and the prices on them that
/// name no plan.
fn invoice_plan_credits(
    catalog: &StripeCatalog,
    lines: &[Value],
) -> Result<(i64, Vec<String>), ProcessError> {
    let mut credits: i64 = 0;
    let mut unknown = Vec::new();
    for line in lines {
        let price = id_of(line, "/pricing/price_details/price").or_else(|| id_of(line, "/price"));
        // A plan change's proration lines (credit for the unused time on the
        // old plan, a charge for the rest of the period on the new one) pay
        // for no period of their own: the new plan's credits come with its
        // next regular line. Counted, each change granted a whole period of
        // both plans, again at every change back and forth. They are lines
        // of the subscription item on an invoice the change made at once,
        // and pending invoice items (the default, `create_prorations`) on
        // the next invoice.
        let proration = bool_at(line, "/parent/subscription_item_details/proration")
            .or_else(|| bool_at(line, "/parent/invoice_item_details/proration"))
            .or_else(|| bool_at(line, "/proration"))
            .unwrap_or(false);
        let quantity = int(line, "/quantity").unwrap_or(1);
        if proration || quantity < 1 {
            continue;
        }
        match price.and_then(|p| catalog.plans.get(p)) {
            Some(per) => {
                credits = per
                    .checked_mul(quantity)
                    .and_then(|c| credits.checked_add(c))
                    .ok_or_else(|| {
                        ProcessError::Permanent("invoice quantities overflow the credits".into())
                    })?;
            }
            None => unknown.extend(price.map(str::to_owned)),
        }
    }
    Ok((credits, unknown))
}

async fn invoice_paid(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    inv: &Value,
) -> Result<Outcome, ProcessError> {
    let (invoice, account) = invoice_and_account(conn, cx, inv).await?;
    record_billing(conn, cx, account, false, invoice).await?;

    let payment_intent = invoice_payment_intent(inv);
    let grant_key = format!("stripe:invoice:{invoice}");
    let out = match earlier_grant(conn, &grant_key, account).await? {
        Some(out) => out,
        None => {
            let lines = invoice_lines(cx, inv, invoice).await?;
            let (credits, unknown) = invoice_plan_credits(cx.catalog, &lines)?;
            if credits == 0 {
                if invoice_subscription(inv).is_some() && !unknown.is_empty() {
                    return Err(ProcessError::Permanent(format!(
                        "no credits configured for plan prices {unknown:?} (STRIPE_PLANS)"
                    )));
                }
                return Ok(Outcome::Processed(format!(
                    "{invoice} paid; no plan credits on it"
                )));
            }
            credits::grant(
                conn,
                &Grant {
                    account_id: account,
                    amount: credits,
                    source: GrantSource::Subscription,
                    grant_key,
                    stripe_object: Some(payment_intent.unwrap_or(invoice).to_owned()),
                    expires_at: None,
                    reason: invoice_subscription(inv).map(|s| format!("subscription {s}")),
                },
                &cx.meta,
            )
            .await?
        }
    };
    // Decided with the grant, once (see `checkout_paid`): a replay that can
    // now read the invoice's payment intent would otherwise earn a second
    // commission under it.
    let paid_for = payment_intent.unwrap_or(invoice);
    if let (true, Some(paid)) = (out.took_effect(), int(inv, "/amount_paid")) {
        let currency = text(inv, "/currency").unwrap_or("usd");
        affiliates::earn(conn, &cx.meta, account, paid_for, currency, paid).await?;
    }
    if let Some(pi) = payment_intent {
        settle_payment(conn, cx, pi).await?;
    }
    Ok(Outcome::Processed(format!(
        "{} {} credits for {invoice}",
        out.outcome, out.amount
    )))
}

async fn invoice_failed(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    inv: &Value,
) -> Result<Outcome, ProcessError> {
    let (invoice, account) = invoice_and_account(conn, cx, inv).await?;
    record_billing(conn, cx, account, true, invoice).await?;
    Ok(Outcome::Processed(format!(
        "{invoice} failed; account past due"
    )))
}

async fn record_billing(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    account: Uuid,
    past_due: bool,
    invoice: &str,
) -> Result<(), Error> {
    let event = NewEvent {
        event_id: store::deterministic_event_id(&format!("billing:{}", cx.event_id)),
        event: DomainEvent::BillingStatusChanged(BillingStatusChanged {
            account_id: account,
            past_due,
            invoice_id: invoice.to_owned(),
            state_at: cx.created,
        }),
        metadata: cx.meta.clone(),
    };
    store::append_and_apply(
        conn,
        &format!("billing-{account}"),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    Ok(())
}

async fn subscription_changed(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    sub: &Value,
) -> Result<Outcome, ProcessError> {
    let id = text(sub, "/id")
        .ok_or_else(|| ProcessError::Permanent("subscription without id".into()))?;
    let status = text(sub, "/status")
        .ok_or_else(|| ProcessError::Permanent("subscription without status".into()))?;
    let customer = id_of(sub, "/customer");
    let account = resolve_account(conn, cx, &[account_from_metadata(sub)], customer).await?;
    // Current API versions keep the period on the items.
    let item = sub.pointer("/items/data/0").cloned().unwrap_or(Value::Null);
    let state = SubscriptionStateChanged {
        account_id: account,
        subscription_id: id.to_owned(),
        customer_id: customer.map(str::to_owned),
        status: status.to_owned(),
        price_id: id_of(&item, "/price").map(str::to_owned),
        current_period_start: time(&item, "/current_period_start")
            .or_else(|| time(sub, "/current_period_start")),
        current_period_end: time(&item, "/current_period_end")
            .or_else(|| time(sub, "/current_period_end")),
        cancel_at_period_end: sub
            .pointer("/cancel_at_period_end")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        canceled_at: time(sub, "/canceled_at"),
        state_at: cx.created,
    };
    let current: Option<(DateTime<Utc>, String)> = sqlx::query_as(
        "select state_at, status from stripe_subscriptions where subscription_id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    // Two different states stamped with the same second: the events cannot
    // tell which came last, so ask Stripe for the object as it is now.
    let tie = matches!(&current, Some((at, old)) if state.state_at == *at && old != status);
    // Where Stripe can be asked and does not answer, the event is tried
    // again later: the tie-break below would keep whichever state was
    // processed first, for as long as the subscription does not change.
    let fresh = match cx.refetch {
        Some(reads) if tie => match reads.get(Refetch::Object(id.to_owned()))? {
            Some(fresh) if text(&fresh, "/status").is_some() => Some(fresh),
            _ => {
                return Err(ProcessError::Retryable(format!(
                    "{id}: two states in the same second, and Stripe could not be asked which is current"
                )));
            }
        },
        _ => None,
    };
    let (state, key, outcome) = if let Some(fresh) = fresh
        && let Some(now_status) = text(&fresh, "/status")
    {
        let item = fresh
            .pointer("/items/data/0")
            .cloned()
            .unwrap_or(Value::Null);
        let refetched = SubscriptionStateChanged {
            status: now_status.to_owned(),
            price_id: id_of(&item, "/price").map(str::to_owned).or(state.price_id),
            current_period_start: time(&item, "/current_period_start")
                .or(state.current_period_start),
            current_period_end: time(&item, "/current_period_end").or(state.current_period_end),
            cancel_at_period_end: fresh
                .pointer("/cancel_at_period_end")
                .and_then(Value::as_bool)
                .unwrap_or(state.cancel_at_period_end),
            canceled_at: time(&fresh, "/canceled_at"),
            // What Stripe says now is newer than the tied states.
            state_at: Utc::now().max(state.state_at + chrono::Duration::milliseconds(1)),
            ..state
        };
        (
            refetched,
            format!("subscription-refetched:{}", cx.event_id),
            format!("{id}: refetched from Stripe, {now_status}"),
        )
    } else {
        let newer = match &current {
            None => true,
            Some((at, old)) => {
                state.state_at > *at
                    || (state.state_at == *at && status == "canceled" && old != "canceled")
            }
        };
        if !newer {
            return Ok(Outcome::Processed(format!(
                "{id}: a newer state is already recorded"
            )));
        }
        (
            state,
            format!("subscription-state:{}", cx.event_id),
            format!("{id} is {status}"),
        )
    };
    let event = NewEvent {
        event_id: store::deterministic_event_id(&key),
        event: DomainEvent::SubscriptionStateChanged(state),
        metadata: cx.meta.clone(),
    };
    store::append_and_apply(
        conn,
        &format!("stripe-subscription-{id}"),
        ExpectedVersion::Any,
        &event,
    )
    .await?;
    Ok(Outcome::Processed(outcome))
}

/// The grant a purchase or an invoice made earlier, under its key. It
/// stands as it was, even where the catalog now prices it otherwise or no
/// longer at all (a replay after `STRIPE_PACKS` or `STRIPE_PLANS` changed):
/// a later configuration does not re-decide what a payment bought.
async fn earlier_grant(
    conn: &mut PgConnection,
    grant_key: &str,
    account: Uuid,
) -> Result<Option<credits::GrantOutcome>, Error> {
    let earlier: Option<(Uuid, i64, i64)> = sqlx::query_as(
        "select bucket_id, amount, debt_settled from credit_buckets
          where grant_key = $1 and account_id = $2",
    )
    .bind(grant_key)
    .bind(account)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(
        earlier.map(|(bucket_id, amount, debt_settled)| credits::GrantOutcome {
            outcome: "duplicate".into(),
            bucket_id,
            amount,
            debt_settled,
        }),
    )
}

/// The grant a charge paid for, found by its payment intent (or the charge).
async fn bucket_of_charge(
    conn: &mut PgConnection,
    charge: Option<&str>,
    payment_intent: Option<&str>,
) -> Result<Option<(Uuid, Uuid, i64)>, Error> {
    let keys: Vec<&str> = [payment_intent, charge].into_iter().flatten().collect();
    Ok(sqlx::query_as(
        "select account_id, bucket_id, amount from credit_buckets
          where stripe_object = any($1) and source in ('purchase', 'subscription')
          order by granted_position limit 1",
    )
    .bind(&keys)
    .fetch_optional(conn)
    .await?)
}

/// The part of `granted` credits that `refunded` of a charge of `amount`
/// takes back (`0 <= refunded <= amount`, `amount > 0`).
fn refund_share(granted: i64, refunded: i64, amount: i64) -> i64 {
    (granted as i128 * refunded as i128 / amount as i128) as i64
}

async fn charge_refunded(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    ch: &Value,
) -> Result<Outcome, ProcessError> {
    let charge =
        text(ch, "/id").ok_or_else(|| ProcessError::Permanent("charge without id".into()))?;
    let amount = int(ch, "/amount")
        .filter(|a| *a > 0)
        .ok_or_else(|| ProcessError::Permanent("charge without amount".into()))?;
    let refunded = int(ch, "/amount_refunded").unwrap_or(0).clamp(0, amount);
    let payment_intent = id_of(ch, "/payment_intent");
    let seen = ChargeRefunds {
        amount,
        refunded,
        standing: false,
    };
    let now = refunds_of_charge(conn, cx, charge, payment_intent, Some(seen))
        .await?
        .unwrap_or(seen);
    settle_refunds(conn, cx, charge, payment_intent, now).await
}

/// Refund events whose object is the refund (`charge.refund.updated` is the
/// older name of `refund.updated`).
const REFUND_EVENTS: [&str; 3] = ["charge.refund.updated", "refund.updated", "refund.failed"];

/// A refund that failed gave nothing back (its money returned to the
/// merchant's balance), nor did one that was canceled.
fn refund_undone(status: Option<&str>) -> bool {
    matches!(status, Some("failed" | "canceled"))
}

/// A refund changed. Credits are taken back by the charge's
/// `charge.refunded`; a refund that failed or was canceled gives back what it
/// took (the charge's refunded share is worked out again without it).
async fn refund_changed(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    rf: &Value,
) -> Result<Outcome, ProcessError> {
    let refund =
        text(rf, "/id").ok_or_else(|| ProcessError::Permanent("refund without id".into()))?;
    let status = text(rf, "/status");
    if !refund_undone(status) {
        return Ok(Outcome::Ignored(format!(
            "{refund} is {}; its charge's charge.refunded takes the credits back",
            status.unwrap_or("without a status")
        )));
    }
    let charge = id_of(rf, "/charge")
        .ok_or_else(|| ProcessError::Permanent(format!("{refund} names no charge")))?;
    let payment_intent = id_of(rf, "/payment_intent");
    let Some(now) = refunds_of_charge(conn, cx, charge, payment_intent, None).await? else {
        return Ok(Outcome::Processed(format!(
            "{refund} {}; nothing was taken back for {charge} yet",
            status.unwrap_or_default()
        )));
    };
    settle_refunds(conn, cx, charge, payment_intent, now).await
}

/// A charge's amount and how much of it is refunded.
#[derive(Debug, Clone, Copy)]
struct ChargeRefunds {
    amount: i64,
    refunded: i64,
    /// `refunded` is what stands now, with refunds that failed or were
    /// canceled left out: credits taken back beyond its share are given back.
    /// Otherwise it is one `charge.refunded`'s running total, which only
    /// ever adds to what was taken (events come in any order).
    standing: bool,
}

/// How much of a charge stands refunded once refunds of it that failed or
/// were canceled are counted out. None while no such refund is mirrored
/// (`seen`, the `charge.refunded` being processed, then speaks for itself),
/// or, for a refund's event, while nothing tells the charge's amount yet.
///
/// Where Stripe can be asked, the charge is read with its refunds: the sum of
/// those still standing is the truth. Where it cannot, the newest
/// `charge.refunded` speaks: Stripe lowers a charge's `amount_refunded` when
/// a refund of it fails, so its figure already leaves out refunds that had
/// failed by then, and counts those made by then that failed only later,
/// which are taken off. (A refund made after it is not in it, failed or not.)
async fn refunds_of_charge(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    charge: &str,
    payment_intent: Option<&str>,
    seen: Option<ChargeRefunds>,
) -> Result<Option<ChargeRefunds>, ProcessError> {
    // Each refund of the charge that failed or was canceled: its amount,
    // when it was made, and when it failed (its first such event), by the
    // payment's index where there is a payment intent.
    macro_rules! undone {
        ($payment:literal) => {
            concat!(
                "select distinct on (object_id)
                        (raw::jsonb #>> '{data,object,amount}')::bigint,
                        (raw::jsonb #>> '{data,object,created}')::bigint,
                        created
                   from stripe_events
                  where event_type = any($2)
                    and coalesce(raw::jsonb #>> '{data,object,charge,id}',
                                 raw::jsonb #>> '{data,object,charge}') = $1
                    and raw::jsonb #>> '{data,object,status}' in ('failed', 'canceled')",
                $payment,
                " order by object_id, created"
            )
        };
    }
    let undone: Vec<(Option<i64>, Option<i64>, DateTime<Utc>)> = match payment_intent {
        Some(pi) => sqlx::query_as(undone!(" and payment_intent = $3"))
            .bind(charge)
            .bind(&REFUND_EVENTS[..])
            .bind(pi),
        None => sqlx::query_as(undone!(""))
            .bind(charge)
            .bind(&REFUND_EVENTS[..]),
    }
    .fetch_all(&mut *conn)
    .await?;
    if undone.is_empty() {
        return Ok(None);
    }
    if let Some(reads) = cx.refetch {
        let fresh = charge_from_stripe(reads, charge, "its refunds")?;
        let amount = int(&fresh, "/amount").filter(|a| *a > 0).ok_or_else(|| {
            ProcessError::Retryable(format!("{charge}: Stripe's answer has no amount"))
        })?;
        let listed = fresh
            .pointer("/refunds/data")
            .and_then(Value::as_array)
            .filter(|_| bool_at(&fresh, "/refunds/has_more") == Some(false));
        let refunded: i128 = match listed {
            Some(refunds) => refunds
                .iter()
                .filter(|r| !refund_undone(text(r, "/status")))
                .map(|r| int(r, "/amount").unwrap_or(0).max(0) as i128)
                .sum(),
            None => int(&fresh, "/amount_refunded").unwrap_or(0) as i128,
        };
        return Ok(Some(ChargeRefunds {
            amount,
            refunded: refunded.clamp(0, amount as i128) as i64,
            standing: true,
        }));
    }
    let snapshots = refunded_snapshots(conn, charge).await?;
    // The newest (of one second, the most refunded: refunds only add to it).
    let Some((amount, newest, at)) = snapshots
        .into_iter()
        .chain(seen.map(|s| (s.amount, s.refunded, cx.created)))
        .max_by_key(|(_, refunded, at)| (*at, *refunded))
    else {
        return Ok(None);
    };
    let failed_since: i128 = undone
        .into_iter()
        .filter(|(_, made, failed_at)| {
            made.and_then(|m| Utc.timestamp_opt(m, 0).single())
                .is_none_or(|m| m <= at)
                && *failed_at > at
        })
        .map(|(a, _, _)| a.unwrap_or(0).max(0) as i128)
        .sum();
    Ok(Some(ChargeRefunds {
        amount,
        refunded: (newest as i128 - failed_since).clamp(0, amount as i128) as i64,
        standing: true,
    }))
}

/// Bring what refunds took of a charge's grant to the refunded share:
/// cumulative, so refunds in any order, and replays, end the same.
async fn settle_refunds(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    charge: &str,
    payment_intent: Option<&str>,
    now: ChargeRefunds,
) -> Result<Outcome, ProcessError> {
    let ChargeRefunds {
        amount, refunded, ..
    } = now;
    let clawed = -settle_commission(conn, cx, charge, payment_intent, Some(now)).await?;
    let Some((account, bucket, granted)) =
        bucket_of_charge(conn, Some(charge), payment_intent).await?
    else {
        return Ok(Outcome::Ignored(format!("{charge} paid for no credits")));
    };
    // The refunded share of the grant, minus what refunds of it already
    // took (less what failed refunds gave back).
    sqlx::query("select credit_lock_account($1)")
        .bind(account)
        .execute(&mut *conn)
        .await?;
    let returns = refund_returns_of(conn, bucket).await?;
    let returned: i64 = returns.iter().map(|(_, amount)| amount).sum();
    let family: Vec<Uuid> = std::iter::once(bucket)
        .chain(returns.iter().map(|(b, _)| *b))
        .collect();
    let restored = restorations_of(conn, &family).await?;
    let mut buckets = vec![bucket];
    buckets.extend(restored.iter().map(|r| r.bucket));
    buckets.extend(returns.iter().map(|(b, _)| *b));
    let mut already = revoked_by_refunds(conn, &buckets).await? - returned;
    // What a won dispute kept back of what it had frozen, for refunds that
    // came while it was open, counts as refunded.
    already += restored.iter().map(|r| r.absorbed).sum::<i64>();
    let target = refund_share(granted, refunded, amount);
    if target < already && now.standing {
        // A refund failed or was canceled: what it took comes back, as a
        // grant of its own that later refunds of the charge take from too.
        // Not while a dispute of the charge stands, though (Stripe fails a
        // pending refund once its charge is disputed): the dispute decides,
        // and a won one gives it back (`dispute_changed`).
        if let Some(dispute) = standing_dispute(conn, charge, payment_intent).await? {
            return Ok(Outcome::Processed(format!(
                "{charge}: {refunded} refunded now; what failed refunds took stays \
                 taken while {dispute} stands"
            )));
        }
        let out = credits::grant(
            conn,
            &Grant {
                account_id: account,
                amount: already - target,
                source: GrantSource::Purchase,
                grant_key: format!("stripe:refund-returned:{bucket}:{returned}"),
                stripe_object: Some(format!("{bucket}:refund-returned")),
                expires_at: None,
                reason: Some("refund failed".into()),
            },
            &cx.meta,
        )
        .await?;
        return Ok(Outcome::Processed(format!(
            "{charge}: {} refunded now; {} {} credits given back ({} debt settled)",
            refunded, out.outcome, out.amount, out.debt_settled
        )));
    }
    if target <= already {
        return Ok(Outcome::Processed(format!(
            "{charge}: refunded share already revoked (commission clawed back: {clawed})"
        )));
    }
    // A refund's key names the running total it brings the grant to; after
    // a failed refund gave credits back, the same total can come again.
    let key = match returned {
        0 => format!("stripe:refund:{charge}:{refunded}"),
        returned => format!("stripe:refund:{charge}:{refunded}:after-return:{returned}"),
    };
    let out = credits::revoke(
        conn,
        account,
        bucket,
        target - already,
        &key,
        Some("refund"),
        &cx.meta,
    )
    .await?;
    // Less than asked: a dispute froze the rest of the grant, or a failed
    // refund's return holds it. While a dispute is open (or lost) the credits
    // are gone already; once it was won, they come out of what the win
    // restored, as they come out of what a failed refund gave back.
    let mut short = target - already - out.amount;
    let mut from_restored = 0;
    for extra in buckets.iter().skip(1) {
        if short <= 0 {
            break;
        }
        let more = credits::revoke(
            conn,
            account,
            *extra,
            short,
            &format!("{key}:restored:{extra}"),
            Some("refund"),
            &cx.meta,
        )
        .await?;
        short -= more.amount;
        from_restored += more.amount;
    }
    Ok(Outcome::Processed(format!(
        "{charge}: {} revoked ({} taken, {} held, {} debt; {from_restored} from a won dispute's \
         restoration or a failed refund's return); commission clawed back: {clawed}",
        out.amount, out.taken, out.held, out.debt_added
    )))
}

/// The grants that gave back what failed refunds of the grant in `bucket`
/// had taken: (bucket, amount), oldest first.
async fn refund_returns_of(
    conn: &mut PgConnection,
    bucket: Uuid,
) -> Result<Vec<(Uuid, i64)>, Error> {
    Ok(sqlx::query_as(
        "select bucket_id, amount from credit_buckets
          where stripe_object = $1 order by granted_position",
    )
    .bind(format!("{bucket}:refund-returned"))
    .fetch_all(&mut *conn)
    .await?)
}

/// A won dispute's restoration of a grant.
struct Restoration {
    bucket: Uuid,
    /// What the dispute froze and the win did not give back (refunded
    /// meanwhile).
    absorbed: i64,
}

/// The restorations by won disputes of a grant, given its bucket and those
/// of what failed refunds of it gave back (a dispute's freeze of a grant is
/// keyed `stripe:dispute:<dispute>`, its restoration is the bucket of
/// `<dispute>:restored`).
async fn restorations_of(
    conn: &mut PgConnection,
    buckets: &[Uuid],
) -> Result<Vec<Restoration>, Error> {
    // A dispute's freeze of what a failed refund gave back is keyed
    // `stripe:dispute:<dispute>:<bucket>`: one dispute, one restoration.
    let rows: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "select b.bucket_id, b.amount, sum(v.amount)::bigint
           from credit_revocations v
           join credit_buckets b
             on b.account_id = v.account_id
            and b.stripe_object =
                split_part(substr(v.revoke_key, length('stripe:dispute:') + 1), ':', 1) || ':restored'
          where v.bucket_id = any($1) and v.revoke_key like 'stripe:dispute:%'
          group by b.bucket_id, b.amount, b.granted_position
          order by b.granted_position",
    )
    .bind(buckets)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(bucket, restored, frozen)| Restoration {
            bucket,
            absorbed: frozen - restored,
        })
        .collect())
}

/// Of the grant in `bucket`, the refunded share that refunds processed so
/// far could not take back because a dispute had frozen it.
async fn refunds_frozen_by_dispute(
    conn: &mut PgConnection,
    bucket: Uuid,
    granted: i64,
    payment_intent: Option<&str>,
    charge: Option<&str>,
) -> Result<i64, Error> {
    let refunds: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(
        "select (raw::jsonb #>> '{data,object,amount}')::bigint,
                (raw::jsonb #>> '{data,object,amount_refunded}')::bigint
           from stripe_events
          where event_type = 'charge.refunded' and status in ('processed', 'ignored')
            and (payment_intent = $1 or object_id = $2)",
    )
    .bind(payment_intent)
    .bind(charge)
    .fetch_all(&mut *conn)
    .await?;
    let target = refunds
        .into_iter()
        .filter_map(|(amount, refunded)| {
            let amount = amount.filter(|a| *a > 0)?;
            let refunded = refunded.unwrap_or(0).clamp(0, amount);
            Some(refund_share(granted, refunded, amount))
        })
        .max()
        .unwrap_or(0);
    let revoked = revoked_by_refunds(conn, &[bucket]).await?;
    Ok((target - revoked).max(0))
}

/// What refunds have revoked so far from these buckets.
async fn revoked_by_refunds(conn: &mut PgConnection, buckets: &[Uuid]) -> Result<i64, Error> {
    Ok(sqlx::query_scalar(
        "select coalesce(sum(amount), 0)::bigint from credit_revocations
          where bucket_id = any($1) and revoke_key like 'stripe:refund:%'",
    )
    .bind(buckets)
    .fetch_one(&mut *conn)
    .await?)
}

async fn dispute_changed(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    dp: &Value,
) -> Result<Outcome, ProcessError> {
    let dispute =
        text(dp, "/id").ok_or_else(|| ProcessError::Permanent("dispute without id".into()))?;
    // Converge on the dispute's latest known state, whatever order its
    // events came in.
    let latest = latest_dispute_status(conn, dispute).await?;
    let status = latest
        .as_deref()
        .or_else(|| text(dp, "/status"))
        .unwrap_or("needs_response");
    if let Some(charge) = id_of(dp, "/charge") {
        settle_commission(conn, cx, charge, id_of(dp, "/payment_intent"), None).await?;
    }
    let Some((account, bucket, _)) =
        bucket_of_charge(conn, id_of(dp, "/charge"), id_of(dp, "/payment_intent")).await?
    else {
        return Ok(Outcome::Ignored(format!(
            "{dispute}: the disputed charge paid for no credits"
        )));
    };
    sqlx::query("select credit_lock_account($1)")
        .bind(account)
        .execute(&mut *conn)
        .await?;
    let revoke_key = format!("stripe:dispute:{dispute}");
    // What it froze: of the grant (`revoke_key`), and of what failed
    // refunds of it had given back (`revoke_key:<bucket>`).
    let revoked: Option<i64> = sqlx::query_scalar(
        "select sum(amount)::bigint from credit_revocations
          where revoke_key = $1 or starts_with(revoke_key, $1 || ':')",
    )
    .bind(&revoke_key)
    .fetch_one(&mut *conn)
    .await?;
    match status {
        "won" => {
            let restored = dispute_won(conn, cx, dp, dispute, account, bucket, revoked).await?;
            // Refunds of the charge that failed meanwhile (Stripe fails a
            // pending refund once its charge is disputed) gave nothing back
            // while the dispute stood; they do now.
            let Some(charge) = id_of(dp, "/charge") else {
                return Ok(restored);
            };
            let payment_intent = id_of(dp, "/payment_intent");
            let Some(now) = refunds_of_charge(conn, cx, charge, payment_intent, None).await? else {
                return Ok(restored);
            };
            let refunds = settle_refunds(conn, cx, charge, payment_intent, now).await?;
            Ok(Outcome::Processed(format!(
                "{}; {}",
                restored.describe(),
                refunds.describe()
            )))
        }
        "needs_response" | "under_review" | "lost" => {
            // Frozen once, by the dispute's first event processed: its later
            // events change its status, not what it froze.
            if let Some(frozen) = revoked {
                return Ok(Outcome::Processed(format!(
                    "{dispute} {status}; {frozen} credits frozen earlier"
                )));
            }
            let granted: i64 =
                sqlx::query_scalar("select amount from credit_buckets where bucket_id = $1")
                    .bind(bucket)
                    .fetch_one(&mut *conn)
                    .await?;
            let share = disputed_share(conn, cx, dp, granted).await?;
            let out = match share {
                0 => None,
                share => Some(
                    credits::revoke(
                        conn,
                        account,
                        bucket,
                        share,
                        &revoke_key,
                        Some("dispute"),
                        &cx.meta,
                    )
                    .await?,
                ),
            };
            let (outcome, frozen, held, debt) = out
                .map_or(("nothing_to_revoke".into(), 0, 0, 0), |o| {
                    (o.outcome, o.amount, o.held, o.debt_added)
                });
            // What failed refunds of the charge gave back is the grant's too:
            // the disputed share comes out of it where the grant has too
            // little left.
            let mut short = share - frozen;
            let mut returns_frozen = 0;
            for (returned, amount) in refund_returns_of(conn, bucket).await? {
                if short <= 0 {
                    break;
                }
                let more = credits::revoke(
                    conn,
                    account,
                    returned,
                    amount.min(short),
                    &format!("{revoke_key}:{returned}"),
                    Some("dispute"),
                    &cx.meta,
                )
                .await?;
                returns_frozen += more.amount;
                short -= more.amount;
            }
            Ok(Outcome::Processed(format!(
                "{dispute} {status}; {outcome} {frozen} of {granted} credits frozen ({held} held, \
                 {debt} debt; {returns_frozen} of what failed refunds gave back)"
            )))
        }
        other => Ok(Outcome::Ignored(format!(
            "{dispute} is {other}; no credits affected"
        ))),
    }
}

/// Charge `charge` as Stripe's API has it now, with its refunds (a round
/// of processing ends to ask, [`Reads`]); retryable when Stripe did not
/// answer, for what the caller wanted of it (`wanted`).
fn charge_from_stripe(reads: &Reads, charge: &str, wanted: &str) -> Result<Value, ProcessError> {
    reads
        .get(Refetch::Object(charge.to_owned()))?
        .ok_or_else(|| {
            ProcessError::Retryable(format!("{charge}: {wanted} could not be read from Stripe"))
        })
}

/// What of a grant a dispute freezes: the disputed share of its charge, as
/// a refund of that much would take. A dispute can be for less than its
/// charge ("only part of the order is disputed"); it can also say more, in
/// another currency or after an exchange rate moved, and then it is all of
/// the grant, as it is where the charge's amount cannot be known (no
/// Stripe API to ask and no event of the charge in the mirror).
async fn disputed_share(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    dp: &Value,
    granted: i64,
) -> Result<i64, ProcessError> {
    let (Some(disputed), Some(charge)) = (int(dp, "/amount"), id_of(dp, "/charge")) else {
        return Ok(granted);
    };
    let mirrored: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
        "select (raw::jsonb #>> '{data,object,amount}')::bigint,
                raw::jsonb #>> '{data,object,currency}'
           from stripe_events
          where object_id = $1 and raw::jsonb #>> '{data,object,object}' = 'charge'
          order by created desc limit 1",
    )
    .bind(charge)
    .fetch_optional(&mut *conn)
    .await?;
    let (amount, currency) = match (mirrored, cx.refetch) {
        (Some((amount, currency)), _) => (amount, currency),
        (None, Some(reads)) => {
            let fresh = charge_from_stripe(reads, charge, "its amount")?;
            (
                int(&fresh, "/amount"),
                text(&fresh, "/currency").map(str::to_owned),
            )
        }
        (None, None) => return Ok(granted),
    };
    match amount {
        Some(amount) if amount > 0 && currency.as_deref() == text(dp, "/currency") => {
            Ok(refund_share(granted, disputed.clamp(0, amount), amount))
        }
        _ => Ok(granted),
    }
}

/// The latest known state of a dispute, whatever order its events came in.
async fn latest_dispute_status(
    conn: &mut PgConnection,
    dispute: &str,
) -> Result<Option<String>, Error> {
    Ok(sqlx::query_scalar(
        "select raw::jsonb #>> '{data,object,status}' from stripe_events
          where object_id = $1 and event_type like 'charge.dispute.%'
          order by created desc, (event_type = 'charge.dispute.closed') desc limit 1",
    )
    .bind(dispute)
    .fetch_optional(&mut *conn)
    .await?
    .flatten())
}

/// What an affiliate keeps of the commission on a charge's payment: none of
/// it while a dispute of the charge stands, else what was earned less the
/// refunded share (as `refunds` has it where it stands, else the most any
/// `charge.refunded` said: refunds only add to it). Returns the change. The
/// payment's state is read only where there is a commission.
async fn settle_commission(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    charge: &str,
    payment_intent: Option<&str>,
    refunds: Option<ChargeRefunds>,
) -> Result<i64, ProcessError> {
    let due = async |conn: &mut PgConnection, earned: i64| {
        if standing_dispute(conn, charge, payment_intent)
            .await?
            .is_some()
        {
            return Ok((0, "dispute"));
        }
        let refunds = match refunds {
            Some(r) if r.standing => Some(r),
            seen => most_refunded(conn, charge, seen).await?,
        };
        let (refunded, amount) = refunds.map_or((0, 1), |r| (r.refunded, r.amount));
        Ok((earned - refund_share(earned, refunded, amount), "refund"))
    };
    let paid_for = payment_intent.unwrap_or(charge);
    Ok(affiliates::settle(conn, &cx.meta, paid_for, due).await?)
}

/// The most of a charge any mirrored `charge.refunded` (or `seen`) says is
/// refunded.
async fn most_refunded(
    conn: &mut PgConnection,
    charge: &str,
    seen: Option<ChargeRefunds>,
) -> Result<Option<ChargeRefunds>, Error> {
    Ok(refunded_snapshots(conn, charge)
        .await?
        .into_iter()
        .map(|(amount, refunded, _)| ChargeRefunds {
            amount,
            refunded,
            standing: false,
        })
        .chain(seen)
        .max_by_key(|r| r.refunded))
}

/// What each mirrored `charge.refunded` of a charge says: the charge's
/// amount, how much of it was refunded then, and when.
async fn refunded_snapshots(
    conn: &mut PgConnection,
    charge: &str,
) -> Result<Vec<(i64, i64, DateTime<Utc>)>, Error> {
    let rows: Vec<(Option<i64>, Option<i64>, DateTime<Utc>)> = sqlx::query_as(
        "select (raw::jsonb #>> '{data,object,amount}')::bigint,
                (raw::jsonb #>> '{data,object,amount_refunded}')::bigint,
                created
           from stripe_events
          where object_id = $1 and event_type = 'charge.refunded'",
    )
    .bind(charge)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(amount, refunded, at)| {
            let amount = amount.filter(|a| *a > 0)?;
            Some((amount, refunded.unwrap_or(0).clamp(0, amount), at))
        })
        .collect())
}

/// A dispute of the charge that stands (open, or lost): it froze the grant,
/// and what a failed refund of the charge took stays taken while it does.
async fn standing_dispute(
    conn: &mut PgConnection,
    charge: &str,
    payment_intent: Option<&str>,
) -> Result<Option<String>, Error> {
    // A dispute names the charge's payment intent where it has one (by
    // the payment's index), else the charge.
    let disputes: Vec<String> = match payment_intent {
        Some(pi) => sqlx::query_scalar(
            "select distinct object_id from stripe_events
              where payment_intent = $1 and event_type like 'charge.dispute.%'
                and object_id is not null",
        )
        .bind(pi),
        None => sqlx::query_scalar(
            "select distinct object_id from stripe_events
              where event_type in ('charge.dispute.created', 'charge.dispute.updated',
                                   'charge.dispute.closed')
                and object_id is not null
                and coalesce(raw::jsonb #>> '{data,object,charge,id}',
                             raw::jsonb #>> '{data,object,charge}') = $1",
        )
        .bind(charge),
    }
    .fetch_all(&mut *conn)
    .await?;
    for dispute in disputes {
        let status = latest_dispute_status(conn, &dispute).await?;
        if matches!(
            status.as_deref(),
            Some("needs_response" | "under_review" | "lost")
        ) {
            return Ok(Some(dispute));
        }
    }
    Ok(None)
}

/// A won dispute gives back what it froze, less what refunds that came
/// while it was open took.
async fn dispute_won(
    conn: &mut PgConnection,
    cx: &Cx<'_>,
    dp: &Value,
    dispute: &str,
    account: Uuid,
    bucket: Uuid,
    revoked: Option<i64>,
) -> Result<Outcome, ProcessError> {
    let Some(frozen) = revoked.filter(|a| *a > 0) else {
        return Ok(Outcome::Processed(format!(
            "{dispute} won; nothing was frozen"
        )));
    };
    let restored_object = format!("{dispute}:restored");
    let done: Option<i64> = sqlx::query_scalar(
        "select amount from credit_buckets where account_id = $1 and stripe_object = $2",
    )
    .bind(account)
    .bind(&restored_object)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(amount) = done {
        return Ok(Outcome::Processed(format!(
            "{dispute} won; {amount} credits restored earlier"
        )));
    }
    // Refunds that came while the dispute was open found the credits
    // frozen: their share is not given back.
    let granted: i64 = sqlx::query_scalar("select amount from credit_buckets where bucket_id = $1")
        .bind(bucket)
        .fetch_one(&mut *conn)
        .await?;
    let refunded = refunds_frozen_by_dispute(
        conn,
        bucket,
        granted,
        id_of(dp, "/payment_intent"),
        id_of(dp, "/charge"),
    )
    .await?;
    let amount = frozen - refunded.min(frozen);
    if amount == 0 {
        return Ok(Outcome::Processed(format!(
            "{dispute} won; refunds took all that was frozen"
        )));
    }
    let out = credits::grant(
        conn,
        &Grant {
            account_id: account,
            amount,
            source: GrantSource::Purchase,
            grant_key: format!("stripe:dispute-won:{dispute}"),
            stripe_object: Some(restored_object),
            expires_at: None,
            reason: Some("dispute won".into()),
        },
        &cx.meta,
    )
    .await?;
    Ok(Outcome::Processed(format!(
        "{dispute} won; {} {} credits restored",
        out.outcome, out.amount
    )))
}

/// A grant has just been made for `payment_intent`: refunds and disputes of
/// it that arrived earlier (and found nothing to take back then) take effect
/// now, each as an effect of its own Stripe event. This is what makes the
/// order of arrival irrelevant.
async fn settle_payment(
    conn: &mut PgConnection,
    grant: &Cx<'_>,
    payment_intent: &str,
) -> Result<(), ProcessError> {
    // Refunds are cumulative: the one with the most refunded decides, but
    // applying each is harmless. Disputes: their latest state decides.
    let related: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "select stripe_event_id, event_type, raw, created from stripe_events
          where payment_intent = $1
            and (event_type = 'charge.refunded' or event_type like 'charge.dispute.%'
                 or event_type = any($2))
            and status in ('processed', 'ignored')
          order by created, stripe_event_id",
    )
    .bind(payment_intent)
    .bind(&REFUND_EVENTS[..])
    .fetch_all(&mut *conn)
    .await?;
    for (id, event_type, raw, created) in related {
        let payload: Value = serde_json::from_str(&raw)
            .map_err(|_| ProcessError::Permanent("mirrored body is not JSON".into()))?;
        let object = payload
            .pointer("/data/object")
            .cloned()
            .unwrap_or(Value::Null);
        let cx = Cx {
            catalog: grant.catalog,
            event_id: &id,
            created,
            meta: Metadata::stripe_effect(&id),
            refetch: grant.refetch,
        };
        let outcome = if event_type == "charge.refunded" {
            charge_refunded(conn, &cx, &object).await?
        } else if REFUND_EVENTS.contains(&event_type.as_str()) {
            refund_changed(conn, &cx, &object).await?
        } else {
            dispute_changed(conn, &cx, &object).await?
        };
        let status = if matches!(outcome, Outcome::Ignored(_)) {
            "ignored"
        } else {
            "processed"
        };
        sqlx::query(
            "update stripe_events set status = $2, outcome = $3 where stripe_event_id = $1",
        )
        .bind(&id)
        .bind(status)
        .bind(outcome.describe())
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Mirrored events selected for replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub id: Option<String>,
    pub event_type: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub failed_only: bool,
    pub pending_only: bool,
}

pub async fn select_for_replay(pool: &PgPool, f: &ReplayFilter) -> Result<Vec<String>, Error> {
    Ok(sqlx::query_scalar(
        "select stripe_event_id from stripe_events
          where ($1::text is null or stripe_event_id = $1)
            and ($2::text is null or event_type = $2)
            and ($3::timestamptz is null or created >= $3)
            and (not $4 or status = 'failed')
            and (not $5 or status = 'pending')
          order by created, stripe_event_id",
    )
    .bind(&f.id)
    .bind(&f.event_type)
    .bind(f.since)
    .bind(f.failed_only)
    .bind(f.pending_only)
    .fetch_all(pool)
    .await?)
}
