//! Extractors that answer in Slate's error format: a JSON body, and the
//! authenticated account.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::{ApiError, AppState};

/// `axum::Json`, but a malformed body gets a stable code.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::client(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            )),
            Err(JsonRejection::JsonSyntaxError(_)) => Err(ApiError::bad_request(
                "invalid_json",
                "the body is not valid JSON",
            )),
            Err(JsonRejection::JsonDataError(_)) => Err(ApiError::unprocessable(
                "invalid_body",
                "the body does not have the expected fields and types",
            )),
            Err(JsonRejection::BytesRejection(_)) => Err(ApiError::payload_too_large()),
            Err(_) => Err(ApiError::bad_request(
                "invalid_body",
                "the body could not be read",
            )),
        }
    }
}

/// The account behind a valid `Authorization: Bearer slate_live_…` key.
#[derive(Debug, Clone, Copy)]
pub struct Auth {
    pub account_id: Uuid,
    pub key_id: Uuid,
    pub staff: bool,
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        let mut conn = state
            .pool
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable {
                code: "database_unavailable",
                message: "the database is unavailable; try again shortly",
            })?;
        let owner = slate_events::access::authenticate(&mut conn, presented)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        tracing::Span::current().record("account_id", tracing::field::display(owner.account_id));
        Ok(Auth {
            account_id: owner.account_id,
            key_id: owner.key_id,
            staff: owner.staff,
        })
    }
}

/// The peer's IP address, when the server was started with connect info.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientIp(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}
