//! `POST /v1/billing/checkout` and `POST /v1/billing/portal`.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, Auth, Json};
use crate::stripe::billing::{self, BillingError, CheckoutRequest};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/billing/checkout", post(checkout))
        .route("/v1/billing/portal", post(portal))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckoutBody {
    /// A configured credit pack or plan (STRIPE_PACKS / STRIPE_PLANS).
    price_id: String,
    /// 1 to 100.
    #[serde(default = "one")]
    #[schema(default = 1, minimum = 1, maximum = 100)]
    quantity: u64,
}

fn one() -> u64 {
    1
}

impl CheckoutBody {
    /// The checks made before Stripe is asked.
    pub(super) fn check(&self) -> Result<(), ApiError> {
        if self.quantity == 0 || self.quantity > 100 {
            return Err(ApiError::unprocessable(
                "invalid_quantity",
                "quantity must be between 1 and 100",
            ));
        }
        Ok(())
    }
}

async fn customer_of(state: &AppState, auth: &Auth) -> Result<Option<String>, ApiError> {
    Ok(sqlx::query_scalar(
        "select customer_id from stripe_customers where account_id = $1 order by linked_at limit 1",
    )
    .bind(auth.account_id)
    .fetch_optional(&state.pool)
    .await?)
}

/// Start a Stripe Checkout session.
///
/// For a credit pack (a payment) or a plan (a subscription).
#[utoipa::path(
    post,
    path = "/v1/billing/checkout",
    tag = "billing",
    operation_id = "create_checkout_session",
    request_body = CheckoutBody,
    responses((status = 200, description = "Send the browser to `url`", body = super::openapi::schemas::CheckoutSession)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
#[tracing::instrument(skip_all)]
pub(super) async fn checkout(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<CheckoutBody>,
) -> Result<Json<Value>, ApiError> {
    // A checkout for the user's Stripe customer can offer the cards it
    // keeps: a purchase is the user's to make.
    auth.not_impersonated()?;
    body.check()?;
    let customer = customer_of(&state, &auth).await?;
    let created = billing::create_checkout(
        state.stripe.as_ref(),
        &state.config.stripe_catalog,
        &CheckoutRequest {
            account_id: auth.account_id,
            price_id: &body.price_id,
            quantity: body.quantity,
            customer: customer.as_deref(),
            public_url: &state.config.public_url,
        },
    )
    .await
    .map_err(to_api_error)?;
    Ok(Json(json!({
        "id": created.id, "url": created.url, "mode": created.mode, "credits": created.credits,
    })))
}

/// Open the Stripe billing portal.
///
/// A billing-portal session for the account's Stripe customer.
#[utoipa::path(
    post,
    path = "/v1/billing/portal",
    tag = "billing",
    operation_id = "create_portal_session",
    responses((status = 200, description = "Send the browser to `url`", body = super::openapi::schemas::PortalSession)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
#[tracing::instrument(skip_all)]
pub(super) async fn portal(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Value>, ApiError> {
    // The portal is the user's billing account (payment methods, billing
    // address, invoices, the subscription): not for staff acting as them.
    auth.not_impersonated()?;
    let customer = customer_of(&state, &auth).await?;
    let url = billing::create_portal(
        state.stripe.as_ref(),
        customer.as_deref(),
        &state.config.public_url,
    )
    .await
    .map_err(to_api_error)?;
    Ok(Json(json!({ "url": url })))
}

fn to_api_error(e: BillingError) -> ApiError {
    match e {
        BillingError::UnknownPrice => ApiError::unprocessable(
            "unknown_price",
            "the price is neither a credit pack nor a plan",
        ),
        BillingError::NoCustomer => ApiError::conflict(
            "no_billing_customer",
            "the account has not bought anything through Stripe yet",
        ),
        BillingError::NotConfigured => ApiError::Unavailable {
            code: "billing_not_configured",
            message: "payments are not configured on this deployment",
        },
        BillingError::Stripe(e) => {
            tracing::error!(error = %e, "stripe api call failed");
            ApiError::Unavailable {
                code: "payment_provider_unavailable",
                message: "the payment provider could not be reached; try again shortly",
            }
        }
        BillingError::NoUrl => ApiError::Internal(anyhow::anyhow!("Stripe returned no URL")),
    }
}

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}
