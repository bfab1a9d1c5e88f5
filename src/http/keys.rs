//! `/v1/keys`: issue (the plaintext is shown once), list, revoke. Rotation
//! is create + revoke; a revoked key stops working at once in every process
//! (every request checks the database).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, AppState, Auth, Json, Path};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/keys", get(list).post(create))
        .route("/v1/keys/{id}", delete(revoke))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateKey {
    /// At most 100 characters.
    #[serde(default)]
    label: Option<String>,
}

impl CreateKey {
    /// The checks made before the database is touched.
    pub(super) fn check(&self) -> Result<(), ApiError> {
        if self.label.as_ref().is_some_and(|l| l.chars().count() > 100) {
            return Err(ApiError::unprocessable(
                "invalid_label",
                "a label is at most 100 characters",
            ));
        }
        Ok(())
    }
}

/// Issue an API key.
///
/// Its plaintext is in this response only.
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    operation_id = "create_key",
    request_body = CreateKey,
    responses((status = 201, description = "Issued", body = super::openapi::schemas::CreatedKey)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    auth.not_impersonated()?;
    auth.second_factor_passed()?;
    body.check()?;
    let mut conn = state.pool.acquire().await?;
    let key = slate_events::access::create_key(
        &mut conn,
        auth.account_id,
        body.label.as_deref(),
        auth.metadata(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": key.key_id,
            "prefix": key.prefix,
            "label": body.label,
            "key": key.plaintext,
            "note": "shown once: only its hash is stored",
        })),
    ))
}

/// List API keys.
///
/// Prefix, label, last use (never a secret).
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    operation_id = "list_keys",
    responses((status = 200, description = "The keys", body = super::openapi::schemas::KeyList)),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Value>, ApiError> {
    let mut conn = super::scoped::scoped(&state.pool, auth.account_id).await?;
    let keys = slate_events::access::list_keys(&mut conn, auth.account_id).await?;
    Ok(Json(json!({ "data": keys })))
}

/// Revoke an API key.
///
/// It stops working at once, in every process.
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    operation_id = "revoke_key",
    params(("id" = Uuid, Path, description = "The key's id")),
    responses((status = 204, description = "Revoked")),
    security(("api_key" = []), ("session_cookie" = [])),
)]
pub(super) async fn revoke(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: Uuid = id.parse().map_err(|_| ApiError::not_found())?;
    let mut conn = state.pool.acquire().await?;
    let revoked =
        slate_events::access::revoke_key(&mut conn, auth.account_id, id, auth.metadata()).await?;
    if revoked {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}
