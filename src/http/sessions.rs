//! Browser sign-in and sessions: `/v1/auth/oidc/start|callback`,
//! `/v1/sessions`.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::json;
use slate_events::Metadata;
use uuid::Uuid;

use super::extract::cookie;
use super::{ApiError, AppState, Auth, Json, Path, Query};
use crate::oidc::{self, SignInError};

const STATE_COOKIE: &str = "slate_oidc_state";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/oidc/start", get(start))
        .route("/v1/auth/oidc/callback", get(callback))
        .route("/v1/sessions", get(list))
        .route("/v1/sessions/{id}", delete(end))
        .route("/v1/sessions/revoke-all", post(revoke_all))
        .route("/v1/auth/totp", post(totp))
}

fn set_cookie(state: &AppState, name: &str, value: &str, max_age: i64) -> HeaderValue {
    let secure = if state.config.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    ))
    .expect("cookie values are ASCII")
}

fn to_api_error(e: SignInError) -> ApiError {
    match e {
        SignInError::NotConfigured => ApiError::Unavailable {
            code: "sign_in_not_configured",
            message: "browser sign-in is not configured",
        },
        SignInError::BadState => ApiError::client(
            StatusCode::UNAUTHORIZED,
            "sign_in_state_invalid",
            "the sign-in attempt is unknown, already used or expired; start again",
        ),
        SignInError::BadToken => ApiError::client(
            StatusCode::UNAUTHORIZED,
            "id_token_invalid",
            "the identity provider's token was refused",
        ),
        SignInError::EmailNotVerified => ApiError::client(
            StatusCode::UNAUTHORIZED,
            "email_not_verified",
            "the identity provider has not verified this email",
        ),
        SignInError::AccountDeleted => ApiError::client(
            StatusCode::FORBIDDEN,
            "account_deleted",
            "this account was deleted and can no longer be restored",
        ),
        SignInError::Provider => ApiError::Unavailable {
            code: "identity_provider_unavailable",
            message: "the identity provider could not be reached",
        },
        SignInError::Store(e) => ApiError::Internal(e.into()),
        SignInError::Db(e) => ApiError::Internal(e.into()),
        SignInError::Queue(e) => ApiError::Internal(e),
    }
}

/// Start browser sign-in.
///
/// Redirects to the identity provider (OpenID Connect) and sets the
/// short-lived `slate_oidc_state` cookie.
#[utoipa::path(
    get,
    path = "/v1/auth/oidc/start",
    tag = "sessions",
    operation_id = "start_sign_in",
    responses((
        status = 302,
        description = "To the identity provider",
        headers(
            ("Location" = String, description = "The provider's authorization URL"),
            ("Set-Cookie" = String, description = "`slate_oidc_state`, 10 minutes"),
        ),
    )),
)]
pub(super) async fn start(State(state): State<AppState>) -> Result<Response, ApiError> {
    let settings = state
        .config
        .oidc
        .as_ref()
        .ok_or(SignInError::NotConfigured)
        .map_err(to_api_error)?;
    let started = oidc::start(&state.pool, settings)
        .await
        .map_err(to_api_error)?;
    let mut response = StatusCode::FOUND.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&started.redirect_to).map_err(|e| ApiError::Internal(e.into()))?,
    );
    headers.insert(
        header::SET_COOKIE,
        set_cookie(&state, STATE_COOKIE, &started.state, 600),
    );
    Ok(response)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct Callback {
    /// The identity provider's authorization code.
    code: String,
    /// Must match the `slate_oidc_state` cookie.
    state: String,
}

/// Finish browser sign-in.
///
/// The identity provider redirects here; a session starts (an account is
/// opened on first sign-in, restored within 30 days of a deletion).
#[utoipa::path(
    get,
    path = "/v1/auth/oidc/callback",
    tag = "sessions",
    operation_id = "finish_sign_in",
    params(Callback),
    responses((
        status = 200,
        description = "Signed in",
        body = super::openapi::schemas::SignedIn,
        headers(("Set-Cookie" = String, description = "The `slate_session` cookie (HttpOnly), and `slate_oidc_state` cleared")),
    )),
)]
pub(super) async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Result<Response, ApiError> {
    let settings = state
        .config
        .oidc
        .as_ref()
        .ok_or(SignInError::NotConfigured)
        .map_err(to_api_error)?;
    let browser_state = cookie(&headers, STATE_COOKIE);
    let signed_in = match oidc::finish(
        &state.pool,
        &state.config,
        settings,
        &q.state,
        browser_state,
        &q.code,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let reason = match &e {
                SignInError::BadState => "sign_in_state_invalid",
                SignInError::BadToken => "id_token_invalid",
                SignInError::EmailNotVerified => "email_not_verified",
                SignInError::AccountDeleted => "account_deleted",
                _ => "sign_in_failed",
            };
            let _ = slate_events::access::record_auth_failure(
                &state.appends,
                reason,
                None,
                None,
                "/v1/auth/oidc/callback",
            )
            .await;
            return Err(to_api_error(e));
        }
    };
    let max_age = (signed_in.session.expires_at - chrono::Utc::now())
        .num_seconds()
        .max(0);
    let mut response = Json(json!({
        "account_id": signed_in.account_id,
        "session_id": signed_in.session.session_id,
        "expires_at": signed_in.session.expires_at,
    }))
    .into_response();
    let h = response.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(
            &state,
            slate_events::sessions::COOKIE,
            &signed_in.session.token,
            max_age,
        ),
    );
    h.append(header::SET_COOKIE, set_cookie(&state, STATE_COOKIE, "", 0));
    Ok(response)
}

/// List sessions.
///
/// The account's live browser sessions.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    operation_id = "list_sessions",
    responses((status = 200, description = "The sessions", body = super::openapi::schemas::SessionList)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut conn = state.pool.acquire().await?;
    let sessions = slate_events::sessions::list(&mut conn, auth.account_id).await?;
    Ok(Json(
        json!({ "data": sessions, "current": auth.session_id }),
    ))
}

fn actor(auth: &Auth) -> Metadata {
    auth.metadata()
}

/// End a session.
///
/// Signs that session out.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    operation_id = "end_session",
    params(("id" = Uuid, Path, description = "The session's id")),
    responses((status = 204, description = "Ended")),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn end(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found())?;
    let mut conn = state.pool.acquire().await?;
    if slate_events::sessions::end(&mut conn, auth.account_id, id, "signed_out", actor(&auth))
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TotpCode {
    /// The authenticator app's current code.
    code: String,
}

/// Verify the second factor.
///
/// A browser session that passes it gets the staff privileges of a staff
/// account.
#[utoipa::path(
    post,
    path = "/v1/auth/totp",
    tag = "sessions",
    operation_id = "verify_totp",
    request_body = TotpCode,
    responses((status = 200, description = "This session passed the second factor", body = super::openapi::schemas::TotpVerified)),
    security(("session_cookie" = [])),
)]
pub(super) async fn totp(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<TotpCode>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The staff member's session is not the user's: their code would be
    // checked against it, and spend the user's attempts.
    auth.not_impersonated()?;
    let session = auth.session_id.ok_or_else(|| {
        ApiError::bad_request(
            "session_required",
            "the second factor is checked for a browser session",
        )
    })?;
    totp_attempt_allowed(&state, auth.account_id).await?;
    let mut tx = state.pool.begin().await?;
    let ok = slate_events::mfa::verify_session(
        &mut tx,
        auth.account_id,
        session,
        &body.code,
        &state.config.sealing_key,
        chrono::Utc::now(),
    )
    .await?;
    tx.commit().await?;
    if !ok {
        let _ = slate_events::access::record_auth_failure(
            &state.appends,
            "totp_invalid",
            None,
            None,
            "/v1/auth/totp",
        )
        .await;
        return Err(ApiError::client(
            StatusCode::UNAUTHORIZED,
            "totp_invalid",
            "the code is wrong, expired or already used",
        ));
    }
    Ok(Json(json!({ "session_id": session, "mfa_verified": true })))
}

/// Second-factor attempts an account gets per window, across its sessions
/// and every web process. Three codes of a million pass at any moment (the
/// current one and its neighbours), so without a limit a stolen first
/// factor could try them all in a few hours; at five attempts in five
/// minutes that takes years.
pub(super) const TOTP_ATTEMPTS: u32 = 5;
pub(super) const TOTP_WINDOW_SECS: u64 = 300;

/// Count one second-factor attempt of `account` (the API's and the
/// console's): 429 `rate_limited` past [`TOTP_ATTEMPTS`] in the window.
pub(super) async fn totp_attempt_allowed(state: &AppState, account: Uuid) -> Result<(), ApiError> {
    state
        .limiter
        .hit(
            "totp",
            &account.to_string(),
            TOTP_ATTEMPTS,
            TOTP_WINDOW_SECS,
        )
        .await
        .allowed("too many second-factor attempts; try again after Retry-After seconds")
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RevokeAll {
    /// Revoke every API key too.
    #[serde(default)]
    include_keys: bool,
}

/// Sign out everywhere.
///
/// Every session, and every API key when asked.
#[utoipa::path(
    post,
    path = "/v1/sessions/revoke-all",
    tag = "sessions",
    operation_id = "revoke_all_sessions",
    request_body = RevokeAll,
    responses((status = 200, description = "Signed out everywhere", body = super::openapi::schemas::SignedOutEverywhere)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn revoke_all(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<RevokeAll>,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The user's own security action: under an impersonation it would end
    // the user's sessions and integrations (a staff target's too).
    auth.not_impersonated()?;
    let mut conn = state.pool.acquire().await?;
    let (sessions, keys) = slate_events::sessions::end_all(
        &mut conn,
        auth.account_id,
        body.include_keys,
        actor(&auth),
    )
    .await?;
    Ok(Json(
        json!({ "sessions_ended": sessions, "keys_revoked": keys }),
    ))
}
