//! The HTTP layer's one error type. Every client error has a stable,
//! machine-readable code; 5xx bodies are generic and the detail goes to the
//! log inside the request span.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: &'static str,
    },
    #[error("the request body is too large")]
    PayloadTooLarge,
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: &'static str,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound => "not_found",
            ApiError::BadRequest { code, .. } => code,
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Unavailable { code, .. } => code,
            ApiError::Internal(_) => "internal_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            tracing::error!(error = ?e, "request failed");
        }
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        (self.status(), Json(body)).into_response()
    }
}

impl From<slate_events::Error> for ApiError {
    fn from(e: slate_events::Error) -> Self {
        ApiError::Internal(e.into())
    }
}
