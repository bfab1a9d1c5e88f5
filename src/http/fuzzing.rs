//! Entry points for the fuzz targets (fuzz/, `scripts/fuzz`): each JSON
//! request body the API reads, through the real extractor ([`Json`]) and the
//! checks its handler makes before it touches the database or Stripe. Not an
//! API.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use uuid::Uuid;

use super::{ApiError, Json};
use crate::generations::SubmitRequest;

/// The operations whose bodies [`read_body`] reads, by OpenAPI operation id
/// (`start_impersonation` is a staff route, not in the document).
pub const OPERATIONS: &[&str] = &[
    "submit_generation",
    "create_checkout_session",
    "create_key",
    "verify_totp",
    "revoke_all_sessions",
    "start_impersonation",
];

/// The providers `submit_generation` is checked against here.
pub const PROVIDERS: &[&str] = &["mock"];

/// The submitting account here (an `input_key` must be under `users/<it>/`).
pub const ACCOUNT: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);

/// Read `body`, sent with `content_type` (if any, and if a valid header
/// value), as `operation`'s handler does before its first side effect.
/// Unknown operations are `not_found`.
pub async fn read_body(
    operation: &str,
    content_type: Option<&[u8]>,
    body: Vec<u8>,
) -> Result<(), ApiError> {
    let mut req = Request::new(Body::from(body));
    if let Some(v) = content_type.and_then(|c| HeaderValue::from_bytes(c).ok()) {
        req.headers_mut().insert(CONTENT_TYPE, v);
    }
    match operation {
        "submit_generation" => {
            let Json(r) = Json::<SubmitRequest>::from_request(req, &()).await?;
            let providers: Vec<String> = PROVIDERS.iter().map(|p| (*p).to_owned()).collect();
            crate::generations::validate(&providers, ACCOUNT, &r)?;
            crate::generations::request_hash(&r)?;
        }
        "create_checkout_session" => {
            let Json(b) = Json::<super::billing::CheckoutBody>::from_request(req, &()).await?;
            b.check()?;
        }
        "create_key" => {
            let Json(b) = Json::<super::keys::CreateKey>::from_request(req, &()).await?;
            b.check()?;
        }
        "verify_totp" => {
            Json::<super::sessions::TotpCode>::from_request(req, &()).await?;
        }
        "revoke_all_sessions" => {
            Json::<super::sessions::RevokeAll>::from_request(req, &()).await?;
        }
        "start_impersonation" => {
            Json::<super::admin::StartImpersonation>::from_request(req, &()).await?;
        }
        _ => return Err(ApiError::not_found()),
    }
    Ok(())
}
