//! Buying credits: Stripe Checkout sessions for packs and plans, and the
//! billing portal.

use std::collections::HashMap;

use slate_events::stripe::StripeCatalog;
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::CheckoutSessionMode;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionCustomerCreation, CreateCheckoutSessionLineItems,
    CreateCheckoutSessionSubscriptionData,
};
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("the price is neither a credit pack nor a plan")]
    UnknownPrice,
    #[error("the account has no Stripe customer yet")]
    NoCustomer,
    #[error("Stripe is not configured")]
    NotConfigured,
    #[error("the Stripe API failed")]
    Stripe(#[source] stripe::StripeError),
    #[error("Stripe answered without a URL")]
    NoUrl,
}

pub struct CheckoutRequest<'a> {
    pub account_id: Uuid,
    pub price_id: &'a str,
    pub quantity: u64,
    /// The account's Stripe customer, when it has one.
    pub customer: Option<&'a str>,
    pub public_url: &'a str,
}

pub struct CheckoutCreated {
    pub id: String,
    pub url: String,
    pub mode: &'static str,
    pub credits: i64,
}

/// Create a Checkout session: packs are one-off payments whose session
/// carries the credits in its metadata; plans are subscriptions.
pub async fn create_checkout(
    client: Option<&stripe::Client>,
    catalog: &StripeCatalog,
    r: &CheckoutRequest<'_>,
) -> Result<CheckoutCreated, BillingError> {
    let (mode, per_unit) = if let Some(c) = catalog.packs.get(r.price_id) {
        (CheckoutSessionMode::Payment, *c)
    } else if let Some(c) = catalog.plans.get(r.price_id) {
        (CheckoutSessionMode::Subscription, *c)
    } else {
        return Err(BillingError::UnknownPrice);
    };
    let client = client.ok_or(BillingError::NotConfigured)?;
    let account = r.account_id.to_string();
    let credits = per_unit * r.quantity as i64;
    let mut metadata = HashMap::from([
        ("slate_account_id".to_owned(), account.clone()),
        ("price_id".to_owned(), r.price_id.to_owned()),
    ]);
    let mut line = CreateCheckoutSessionLineItems::new();
    line.price = Some(r.price_id.to_owned());
    line.quantity = Some(r.quantity);
    let mut req = CreateCheckoutSession::new()
        .client_reference_id(account.clone())
        .line_items(vec![line])
        .success_url(format!(
            "{}/billing/success?session_id={{CHECKOUT_SESSION_ID}}",
            r.public_url
        ))
        .cancel_url(format!("{}/billing/canceled", r.public_url));
    let mode_name = match mode {
        CheckoutSessionMode::Payment => {
            metadata.insert("credits".to_owned(), credits.to_string());
            if r.customer.is_none() {
                req = req.customer_creation(CreateCheckoutSessionCustomerCreation::Always);
            }
            "payment"
        }
        _ => {
            let mut sub = CreateCheckoutSessionSubscriptionData::new();
            sub.metadata = Some(HashMap::from([(
                "slate_account_id".to_owned(),
                account.clone(),
            )]));
            req = req.subscription_data(sub);
            "subscription"
        }
    };
    if let Some(customer) = r.customer {
        req = req.customer(customer.to_owned());
    }
    let session = req
        .mode(mode)
        .metadata(metadata)
        .send(client)
        .await
        .map_err(BillingError::Stripe)?;
    Ok(CheckoutCreated {
        id: session.id.as_str().to_owned(),
        url: session.url.ok_or(BillingError::NoUrl)?,
        mode: mode_name,
        credits,
    })
}

/// A billing-portal session for the account's Stripe customer.
pub async fn create_portal(
    client: Option<&stripe::Client>,
    customer: Option<&str>,
    public_url: &str,
) -> Result<String, BillingError> {
    let customer = customer.ok_or(BillingError::NoCustomer)?;
    let client = client.ok_or(BillingError::NotConfigured)?;
    let session = CreateBillingPortalSession::new()
        .customer(customer.to_owned())
        .return_url(format!("{public_url}/billing"))
        .send(client)
        .await
        .map_err(BillingError::Stripe)?;
    Ok(session.url)
}

/// Cancel a subscription at once for a purge: ask Stripe for its state
/// first (a re-run after a crash finds it canceled and does nothing), then
/// cancel with an idempotency key derived from its id.
pub fn subscription_canceller(
    client: stripe::Client,
) -> slate_workers::purge::SubscriptionCanceller {
    use slate_workers::purge::Cancel;
    use stripe_billing::subscription::{CancelSubscription, RetrieveSubscription};
    use stripe_client_core::{IdempotencyKey, RequestStrategy, StripeRequest};
    let client = std::sync::Arc::new(client);
    std::sync::Arc::new(move |id: String| {
        let client = client.clone();
        Box::pin(async move {
            let status = |v: &miniserde::json::Value| match v {
                miniserde::json::Value::Object(o) => match o.get("status") {
                    Some(miniserde::json::Value::String(s)) => s.clone(),
                    _ => String::new(),
                },
                _ => String::new(),
            };
            let current = RetrieveSubscription::new(id.as_str())
                .build()
                .customize::<miniserde::json::Value>()
                .send(&*client)
                .await;
            match current {
                Ok(v) if matches!(status(&v).as_str(), "canceled" | "incomplete_expired") => {
                    return Ok(Cancel::AlreadyCanceled);
                }
                Ok(_) => {}
                Err(stripe::StripeError::Stripe(_, 404)) => return Ok(Cancel::Missing),
                Err(e) => return Err(describe(&e)),
            }
            let key = IdempotencyKey::new(format!("slate-purge-cancel-{id}"))
                .map_err(|_| "the idempotency key is malformed".to_owned())?;
            match CancelSubscription::new(id.as_str())
                .prorate(false)
                .invoice_now(false)
                .build()
                .customize::<miniserde::json::Value>()
                .request_strategy(RequestStrategy::Idempotent(key))
                .send(&*client)
                .await
            {
                Ok(_) => Ok(Cancel::Canceled),
                Err(stripe::StripeError::Stripe(_, 404)) => Ok(Cancel::Missing),
                Err(e) => Err(describe(&e)),
            }
        })
    })
}

/// Set a subscription's renewal for its account's deletion or restore (see
/// `slate_workers::renewal`): read it first, then change only what needs
/// changing, with `key` as the idempotency key. A subscription its owner had
/// set to end is left alone both ways; one the deletion set to end is marked
/// so in its metadata, and only that is undone by a restore.
pub fn subscription_renewal(client: stripe::Client) -> slate_workers::renewal::RenewalSetter {
    use miniserde::json::Value;
    use slate_workers::renewal::{
        Changed, MARK_KEY, MARK_VALUE, OWNERS_DATE_KEY, PAUSED_INVOICE_KEY, Want,
    };
    use stripe_billing::subscription::{
        RetrieveSubscription, UpdateSubscription, UpdateSubscriptionCancelAt,
    };
    use stripe_client_core::{IdempotencyKey, RequestStrategy, StripeRequest};
    let client = std::sync::Arc::new(client);
    std::sync::Arc::new(move |id: String, want: Want, key: String| {
        let client = client.clone();
        Box::pin(async move {
            let current = match RetrieveSubscription::new(id.as_str())
                .build()
                .customize::<Value>()
                .send(&*client)
                .await
            {
                Ok(v) => v,
                Err(stripe::StripeError::Stripe(_, 404)) => {
                    return Ok(Changed::Unchanged("unknown to Stripe"));
                }
                Err(stripe::StripeError::Stripe(_, status)) if refusal(status) => {
                    return Ok(Changed::Refused(status));
                }
                Err(e) => return Err(describe(&e)),
            };
            let Value::Object(sub) = &current else {
                return Err("Stripe's answer was unreadable".into());
            };
            let status = match sub.get("status") {
                Some(Value::String(s)) => s.as_str(),
                _ => "",
            };
            // Current API versions keep the period on the items.
            let period_end = match sub.get("items") {
                Some(Value::Object(items)) => match items.get("data") {
                    Some(Value::Array(data)) => match data.first() {
                        Some(Value::Object(item)) => seconds(item.get("current_period_end")),
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            }
            .or_else(|| seconds(sub.get("current_period_end")));
            // Set to cancel at a date after this period (a date its owner
            // chose): it renews until then, so it is stopped like one that
            // renews, and the date is kept to be put back by a restore.
            let cancel_at = seconds(sub.get("cancel_at"));
            let later = cancel_at.filter(|at| period_end.is_some_and(|end| *at > end));
            let ends = matches!(sub.get("cancel_at_period_end"), Some(Value::Bool(true)))
                || (cancel_at.is_some() && later.is_none());
            let metadata = |k: &str| match sub.get("metadata") {
                Some(Value::Object(m)) => match m.get(k) {
                    Some(Value::String(v)) if !v.is_empty() => Some(v.clone()),
                    _ => None,
                },
                _ => None,
            };
            let marked = metadata(MARK_KEY).as_deref() == Some(MARK_VALUE);
            let owners_date = metadata(OWNERS_DATE_KEY).and_then(|v| v.parse::<i64>().ok());
            if matches!(status, "canceled" | "incomplete_expired") {
                return Ok(Changed::Unchanged("already ended"));
            }
            // Stripe changes only the metadata of an incomplete one; it
            // renews nothing until its first invoice is paid.
            if status == "incomplete" {
                return Ok(Changed::Unchanged(
                    "incomplete: its first invoice is unpaid",
                ));
            }
            // A renewal already billed and unpaid (`past_due`) is retried
            // by Stripe whatever the subscription is set to do next: its
            // invoice's automatic collection is paused too, if it was on,
            // and turned on again by a restore. The subscription's metadata
            // names it before it is paused, so that a restore finds it
            // whatever happened in between.
            let latest_invoice = match sub.get("latest_invoice") {
                Some(Value::String(i)) => Some(i.clone()),
                Some(Value::Object(o)) => match o.get("id") {
                    Some(Value::String(i)) => Some(i.clone()),
                    _ => None,
                },
                _ => None,
            };
            let paused = metadata(PAUSED_INVOICE_KEY);
            let invoice = match (want, status, latest_invoice, paused.clone()) {
                // Named by an earlier run, which may have died before the
                // pause: pausing again is harmless.
                (Want::Stop, _, _, Some(invoice)) => Some((invoice, false)),
                (Want::Stop, "past_due", Some(invoice), None) => collecting(&client, &invoice)
                    .await?
                    .then_some((invoice, false)),
                (Want::Resume, _, _, Some(invoice)) => Some((invoice, true)),
                _ => None,
            };
            let renewal = match (want, ends, marked) {
                (Want::Stop, false, _) => Ok(MARK_VALUE),
                (Want::Stop, true, true) => Err("already set to end by the deletion"),
                (Want::Stop, true, false) => Err("already set to end by its owner"),
                // Stripe unsets a metadata key given an empty value.
                (Want::Resume, true, true) => Ok(""),
                (Want::Resume, true, false) => Err("set to end by its owner, not the deletion"),
                (Want::Resume, false, _) => Err("renews already"),
            };
            let invoice_key = |invoice: &str| format!("{key}-{invoice}");
            // A restore turns collection on again before it forgets the
            // invoice.
            if let Some((invoice, true)) = &invoice {
                auto_advance(&client, invoice, true, &invoice_key(invoice)).await?;
            }
            let mut marks = std::collections::HashMap::new();
            let mut update = UpdateSubscription::new(id.as_str());
            match &invoice {
                Some((invoice, false)) if paused.is_none() => {
                    marks.insert(PAUSED_INVOICE_KEY.to_owned(), invoice.clone());
                }
                Some((_, true)) => {
                    marks.insert(PAUSED_INVOICE_KEY.to_owned(), String::new());
                }
                _ => {}
            }
            if let Ok(mark) = renewal {
                marks.insert(MARK_KEY.to_owned(), mark.to_owned());
                match (want, owners_date) {
                    (Want::Stop, _) => {
                        let kept = later.map(|at| at.to_string()).unwrap_or_default();
                        marks.insert(OWNERS_DATE_KEY.to_owned(), kept);
                        update = update.cancel_at_period_end(true);
                    }
                    // Back to the date its owner had chosen.
                    (Want::Resume, Some(at)) => {
                        marks.insert(OWNERS_DATE_KEY.to_owned(), String::new());
                        update = update.cancel_at(UpdateSubscriptionCancelAt::Timestamp(at));
                    }
                    (Want::Resume, None) => update = update.cancel_at_period_end(false),
                }
            }
            let outcome = if marks.is_empty() {
                // Nothing to write on the subscription itself.
                Changed::Unchanged(renewal.err().unwrap_or("unchanged"))
            } else {
                let key = IdempotencyKey::new(key.as_str())
                    .map_err(|_| "the idempotency key is malformed".to_owned())?;
                match update
                    .metadata(marks)
                    .build()
                    .customize::<Value>()
                    .request_strategy(RequestStrategy::Idempotent(key))
                    .send(&*client)
                    .await
                {
                    Ok(_) => match renewal {
                        Ok(_) => Changed::Done,
                        Err(why) => Changed::Unchanged(why),
                    },
                    Err(stripe::StripeError::Stripe(_, 404)) => {
                        return Ok(Changed::Unchanged("unknown to Stripe"));
                    }
                    Err(stripe::StripeError::Stripe(_, status)) if refusal(status) => {
                        return Ok(Changed::Refused(status));
                    }
                    Err(e) => return Err(describe(&e)),
                }
            };
            // Named now: pause it.
            if let Some((invoice, false)) = &invoice {
                auto_advance(&client, invoice, false, &invoice_key(invoice)).await?;
            }
            Ok(outcome)
        })
    })
}

/// Whether an invoice is open and collected automatically (Stripe retries
/// it). `Ok(false)` also when Stripe refuses to say (see [`refusal`]).
async fn collecting(client: &stripe::Client, invoice: &str) -> Result<bool, String> {
    use miniserde::json::Value;
    use stripe_client_core::{RequestBuilder, StripeMethod};
    if !super::is_id(invoice) {
        return Ok(false);
    }
    match RequestBuilder::new(StripeMethod::Get, format!("/invoices/{invoice}"))
        .customize::<Value>()
        .send(client)
        .await
    {
        Ok(Value::Object(o)) => Ok(
            matches!(o.get("status"), Some(Value::String(s)) if s == "open")
                && matches!(o.get("auto_advance"), Some(Value::Bool(true))),
        ),
        Ok(_) => Err("Stripe's answer was unreadable".into()),
        Err(stripe::StripeError::Stripe(_, status)) if refusal(status) => Ok(false),
        Err(e) => Err(describe(&e)),
    }
}

/// Pause (`collect` false) or resume an invoice's automatic collection
/// (`auto_advance`: Stripe's retries of an unpaid one). `Ok(false)`: Stripe
/// refused (see [`refusal`]); an `Err` is worth another try.
async fn auto_advance(
    client: &stripe::Client,
    invoice: &str,
    collect: bool,
    key: &str,
) -> Result<bool, String> {
    use stripe_client_core::{IdempotencyKey, RequestBuilder, RequestStrategy, StripeMethod};
    #[derive(serde::Serialize)]
    struct Form {
        auto_advance: bool,
    }
    if !super::is_id(invoice) {
        return Ok(false);
    }
    let key =
        IdempotencyKey::new(key).map_err(|_| "the idempotency key is malformed".to_owned())?;
    match RequestBuilder::new(StripeMethod::Post, format!("/invoices/{invoice}"))
        .form(&Form {
            auto_advance: collect,
        })
        .customize::<miniserde::json::Value>()
        .request_strategy(RequestStrategy::Idempotent(key))
        .send(client)
        .await
    {
        Ok(_) => Ok(true),
        Err(stripe::StripeError::Stripe(_, status)) if refusal(status) => Ok(false),
        Err(e) => Err(describe(&e)),
    }
}

/// Whole seconds (a Stripe timestamp), if `v` is one.
fn seconds(v: Option<&miniserde::json::Value>) -> Option<i64> {
    use miniserde::json::{Number, Value};
    match v {
        Some(Value::Number(Number::U64(n))) => i64::try_from(*n).ok(),
        Some(Value::Number(Number::I64(n))) => Some(*n),
        _ => None,
    }
}

/// A Stripe answer that asking again will not change: a 4xx other than a
/// key or permission problem an operator can fix (401, 403), a conflict
/// (409) or a rate limit (429).
fn refusal(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 409 | 429)
}

/// A Stripe failure in words that carry no request or response body.
fn describe(e: &stripe::StripeError) -> String {
    match e {
        stripe::StripeError::Stripe(_, status) => format!("Stripe answered HTTP {status}"),
        stripe::StripeError::Timeout => "Stripe timed out".into(),
        stripe::StripeError::ClientError(_) => "Stripe could not be reached".into(),
        _ => "Stripe's answer was unreadable".into(),
    }
}
