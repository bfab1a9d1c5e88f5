//! The HTTP layer's one error type. Every client error has a stable,
//! machine-readable code and a fixed message; 5xx bodies are generic and the
//! detail goes to the log inside the request span.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A client mistake (4xx) with a stable code.
    #[error("{message}")]
    Client {
        status: StatusCode,
        code: &'static str,
        message: &'static str,
        details: Option<Value>,
        retry_after: Option<u64>,
    },
    #[error("{message}")]
    Unavailable {
        code: &'static str,
        message: &'static str,
    },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn client(status: StatusCode, code: &'static str, message: &'static str) -> Self {
        ApiError::Client {
            status,
            code,
            message,
            details: None,
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: &'static str) -> Self {
        Self::client(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unprocessable(code: &'static str, message: &'static str) -> Self {
        Self::client(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    pub fn conflict(code: &'static str, message: &'static str) -> Self {
        Self::client(StatusCode::CONFLICT, code, message)
    }

    pub fn not_found() -> Self {
        Self::client(StatusCode::NOT_FOUND, "not_found", "not found")
    }

    pub fn unauthorized() -> Self {
        Self::client(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid API key is required (Authorization: Bearer slate_live_…)",
        )
    }

    pub fn forbidden() -> Self {
        Self::client(
            StatusCode::FORBIDDEN,
            "forbidden",
            "not allowed for this account",
        )
    }

    pub fn payload_too_large() -> Self {
        Self::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is too large",
        )
    }

    pub fn with_details(mut self, value: Value) -> Self {
        if let ApiError::Client { details, .. } = &mut self {
            *details = Some(value);
        }
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        if let ApiError::Client { retry_after, .. } = &mut self {
            *retry_after = Some(secs);
        }
        self
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Client { status, .. } => *status,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Client { code, .. } | ApiError::Unavailable { code, .. } => code,
            ApiError::Internal(_) => "internal_error",
        }
    }
}

/// True when the error comes from PostgreSQL being out of reach (down,
/// restarting, refusing connections, or the pool timing out waiting for one):
/// the client may retry, so it is a 503, not a 500.
pub fn is_database_unavailable(e: &anyhow::Error) -> bool {
    slate_events::db::unavailable_in(e.as_ref())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(e) = &self {
            if is_database_unavailable(e) {
                tracing::warn!(error = ?e, "database unavailable");
                let mut response = ApiError::Unavailable {
                    code: "database_unavailable",
                    message: "the service is briefly unavailable; retry shortly",
                }
                .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
                return response;
            }
            tracing::error!(error = ?e, "request failed");
        }
        let mut error = json!({ "code": self.code(), "message": self.to_string() });
        let mut retry = None;
        if let ApiError::Client {
            details,
            retry_after,
            ..
        } = &self
        {
            if let Some(d) = details {
                error["details"] = d.clone();
            }
            retry = *retry_after;
        }
        let mut response = (self.status(), Json(json!({ "error": error }))).into_response();
        if let Some(secs) = retry
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<slate_events::Error> for ApiError {
    fn from(e: slate_events::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}
