//! Extractors that answer in Slate's error format: a JSON body, and the
//! authenticated account.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use slate_events::vault::AccountKey;
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
        // Parsed as a JSON value first, so that a NUL character anywhere (which
        // neither PostgreSQL text nor jsonb can hold) is refused up front.
        let value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(JsonRejection::MissingJsonContentType(_)) => {
                return Err(ApiError::client(
                    axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as application/json",
                ));
            }
            Err(JsonRejection::JsonSyntaxError(_)) | Err(JsonRejection::JsonDataError(_)) => {
                return Err(ApiError::bad_request(
                    "invalid_json",
                    "the body is not valid JSON",
                ));
            }
            Err(JsonRejection::BytesRejection(_)) => return Err(ApiError::payload_too_large()),
            Err(_) => {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "the body could not be read",
                ));
            }
        };
        let mismatch = || {
            ApiError::unprocessable(
                "invalid_body",
                "the body does not have the expected fields and types",
            )
        };
        // Every body of this API is an object. serde reads a struct from an
        // array too, field by field in declaration order, so without this
        // `["script", "local", "hi"]` was taken for a submission and `[]`
        // for a new key.
        if !value.is_object() || has_nul(&value) {
            return Err(mismatch());
        }
        serde_json::from_value(value)
            .map(Json)
            .map_err(|_| mismatch())
    }
}

/// True when a string (or a key) anywhere in `v` holds a NUL character.
fn has_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// True when percent-encoded text holds a NUL character, raw or encoded.
fn encodes_nul(raw: &[u8]) -> bool {
    raw.contains(&0) || raw.windows(3).any(|w| w == b"%00")
}

/// `axum::extract::Path`, but a segment that cannot be decoded (percent-
/// escapes that are not UTF-8, say) is `not_found` in Slate's error format
/// instead of axum's plain-text 400: such an id names nothing.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(_) => Err(ApiError::not_found()),
        }
    }
}

/// `axum::extract::Query`, but a malformed query string gets a stable code
/// (`invalid_query`) in Slate's error format instead of axum's plain text.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let refused = || {
            ApiError::bad_request(
                "invalid_query",
                "the query string does not have the expected parameters and types",
            )
        };
        if parts.uri.query().is_some_and(|q| encodes_nul(q.as_bytes())) {
            return Err(refused());
        }
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(_) => Err(refused()),
        }
    }
}

/// A query parameter given empty (`?cursor=`, `?limit=`) is no parameter,
/// as an empty filter is no filter: `#[serde(default, deserialize_with =
/// "empty_is_none")]` on an `Option` of a number. A value that does not
/// parse is refused (`invalid_query`, by [`Query`]).
pub fn empty_is_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
{
    match <Option<String> as serde::Deserialize>::deserialize(d)? {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("not a number")),
    }
}

/// `axum::Form` (the staff console's forms), answering in Slate's error format.
pub struct Form<T>(pub T);

impl<T, S> FromRequest<S> for Form<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        use axum::extract::rejection::FormRejection;
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, 64 * 1024).await {
            Ok(b) => b,
            Err(_) => return Err(ApiError::payload_too_large()),
        };
        if encodes_nul(&bytes) {
            return Err(ApiError::unprocessable(
                "invalid_body",
                "the form does not have the expected fields and types",
            ));
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(v)) => Ok(Form(v)),
            Err(FormRejection::InvalidFormContentType(_)) => Err(ApiError::client(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the form as application/x-www-form-urlencoded",
            )),
            Err(_) => Err(ApiError::unprocessable(
                "invalid_body",
                "the form does not have the expected fields and types",
            )),
        }
    }
}

/// The credential of an `Authorization: Bearer …` header ("" when the
/// header is of another scheme or not text).
pub(super) fn bearer(header: &axum::http::HeaderValue) -> &str {
    header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("")
}

/// The account behind a valid `Authorization: Bearer slate_live_…` key.
#[derive(Debug, Clone)]
pub struct Auth {
    pub account_id: Uuid,
    /// The API key used, or the browser session.
    pub key_id: Option<Uuid>,
    pub session_id: Option<Uuid>,
    pub staff: bool,
    /// A staff account's browser session that has not passed the second
    /// factor yet: it acts as an ordinary account, and may not issue keys
    /// (a key carries the account's staff rights without a second factor).
    pub second_factor_pending: bool,
    /// The staff member acting as this account, under an impersonation.
    pub impersonator: Option<Uuid>,
    /// That impersonation.
    pub impersonation_id: Option<Uuid>,
    /// Where the request came from (for the audit trail).
    pub origin: Origin,
}

/// The request's id, client address and user agent, as the log records
/// them: the address and the user agent sealed with the data key of the
/// account whose credential made the request, so that its purge erases
/// them (staff read them opened).
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub request_id: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl Origin {
    fn of(parts: &Parts) -> Self {
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(200).collect::<String>())
        };
        Self {
            request_id: header("x-request-id"),
            ip: parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip().to_string()),
            user_agent: header("user-agent"),
        }
    }

    /// Seal the address and the user agent with the data key of the
    /// account that presented the credential (read with it; created here
    /// on the account's first request if it has none). Left out if the key
    /// was erased.
    async fn sealed(
        mut self,
        conn: &mut sqlx::PgConnection,
        account_id: Uuid,
        key: Option<AccountKey>,
    ) -> Result<Self, ApiError> {
        if self.ip.is_none() && self.user_agent.is_none() {
            return Ok(self);
        }
        let key = AccountKey::known_or_create(conn, account_id, key).await?;
        let seal = |v: Option<String>| Some(key.as_ref()?.seal(&v?));
        self.ip = seal(self.ip.take());
        self.user_agent = seal(self.user_agent.take());
        Ok(self)
    }
}

impl Auth {
    /// Refuse what must not be done as someone else: issuing a credential
    /// (it would outlive the impersonation, and carry the account's staff
    /// rights if it has any), reading the account's signing secret, deleting
    /// the account.
    pub fn not_impersonated(&self) -> Result<(), ApiError> {
        match self.impersonator {
            Some(_) => Err(ApiError::client(
                axum::http::StatusCode::FORBIDDEN,
                "impersonation_forbidden",
                "not available under an impersonation",
            )),
            None => Ok(()),
        }
    }

    /// Refuse a staff account's session that has not passed the second
    /// factor.
    pub fn second_factor_passed(&self) -> Result<(), ApiError> {
        if self.second_factor_pending {
            return Err(ApiError::client(
                axum::http::StatusCode::FORBIDDEN,
                "second_factor_required",
                "pass the second factor (POST /v1/auth/totp) first",
            ));
        }
        Ok(())
    }

    /// Whether what authenticated this caller still holds: the key not
    /// revoked, the session neither ended nor past its absolute timeout, the
    /// impersonation neither ended nor expired (and its staff member still
    /// staff), the account not deleted, and, with `staff`, the caller still
    /// staff. A session asked about is in use: its idle clock restarts, as a
    /// request's would. See [`Reauthorise`].
    pub async fn still_valid(&self, pool: &sqlx::PgPool, staff: bool) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "with in_use as (
                update sessions set last_seen_at = now()
                 where session_id = $2 and ended_at is null and expires_at > now()
                   and (last_seen_at is null or last_seen_at < now() - interval '30 seconds'))
             select ($1::uuid is null or exists (
                        select 1 from api_keys where key_id = $1 and revoked_at is null))
                and ($2::uuid is null or exists (
                        select 1 from sessions
                         where session_id = $2 and ended_at is null and expires_at > now()))
                and ($3::uuid is null or exists (
                        select 1 from impersonations i join accounts s on s.account_id = i.staff_id
                         where i.impersonation_id = $3 and i.ended_at is null
                           and i.expires_at > now() and s.staff and s.deleted_at is null))
                and exists (
                        select 1 from accounts
                         where account_id = $4 and deleted_at is null and (staff or not $5))",
        )
        .bind(self.key_id)
        .bind(self.session_id)
        .bind(self.impersonation_id)
        .bind(self.account_id)
        .bind(staff)
        .fetch_one(pool)
        .await
    }

    /// Event metadata for what this caller does: the account, and the
    /// impersonating staff member if any (attributed to both).
    pub fn metadata(&self) -> slate_events::Metadata {
        slate_events::Metadata {
            impersonator: self.impersonator,
            ..self.with_origin(slate_events::Actor::User {
                account_id: self.account_id,
            })
        }
    }

    /// What a staff member does as staff (not as an account they act for):
    /// the staff actor, with the request's origin.
    pub fn staff_metadata(&self) -> slate_events::Metadata {
        self.with_origin(slate_events::Actor::Staff {
            account_id: self.account_id,
        })
    }

    /// `actor`'s metadata with this request's id, key, address and user
    /// agent (the last two sealed with the credential's account's key).
    fn with_origin(&self, actor: slate_events::Actor) -> slate_events::Metadata {
        slate_events::Metadata {
            request_id: self.origin.request_id.clone(),
            api_key_id: self.key_id,
            ip: self.origin.ip.clone(),
            user_agent: self.origin.user_agent.clone(),
            ..slate_events::Metadata::by(actor)
        }
    }
}

/// A long response (a generation's event stream, an export) asks again, as
/// it goes, whether its caller's access still holds: what was allowed at its
/// start may have been withdrawn since (a revoked key, an ended session or
/// impersonation, a deleted account).
pub struct Reauthorise {
    auth: Auth,
    staff: bool,
    /// The last time access was found to hold.
    held_at: tokio::time::Instant,
}

/// Why a long response stopped.
#[derive(Debug, thiserror::Error)]
pub enum Withdrawn {
    #[error("access was withdrawn")]
    Access,
    #[error("access could not be checked for {0:?}")]
    Unchecked(std::time::Duration),
}

impl Reauthorise {
    /// How often access is asked about.
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(5);
    /// How long PostgreSQL may fail to answer (a saturated pool, an outage)
    /// before the response stops anyway.
    pub const GRACE: std::time::Duration = std::time::Duration::from_secs(30);

    /// `staff`: the response is for staff, who must still be staff.
    pub fn new(auth: Auth, staff: bool) -> Self {
        Self {
            auth,
            staff,
            held_at: tokio::time::Instant::now(),
        }
    }

    /// Ok while access holds, or has held within [`Self::GRACE`] and cannot
    /// be checked just now; asks PostgreSQL at most every [`Self::EVERY`].
    pub async fn check(&mut self, pool: &sqlx::PgPool) -> Result<(), Withdrawn> {
        if self.held_at.elapsed() < Self::EVERY {
            return Ok(());
        }
        match self.auth.still_valid(pool, self.staff).await {
            Ok(true) => {
                self.held_at = tokio::time::Instant::now();
                Ok(())
            }
            Ok(false) => Err(Withdrawn::Access),
            Err(e) if self.held_at.elapsed() < Self::GRACE => {
                tracing::warn!(error = %e, "could not check a long response's access; asking again");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not check a long response's access; stopping it");
                Err(Withdrawn::Unchecked(self.held_at.elapsed()))
            }
        }
    }
}

/// Filled by the Auth extractor, read by the banner middleware: responses
/// under an impersonation say so.
#[derive(Clone, Default)]
pub struct ImpersonationSlot(pub std::sync::Arc<std::sync::Mutex<Option<String>>>);

pub const IMPERSONATE_HEADER: &str = "slate-impersonate";
pub const BANNER_HEADER: &str = "slate-impersonation";

/// Turn a staff caller into the impersonated account when the request asks.
async fn impersonate(parts: &mut Parts, state: &AppState, auth: Auth) -> Result<Auth, ApiError> {
    let Some(requested) = parts.headers.get(IMPERSONATE_HEADER) else {
        return Ok(auth);
    };
    let refused = || {
        ApiError::client(
            axum::http::StatusCode::FORBIDDEN,
            "impersonation_invalid",
            "no live impersonation of yours has this id",
        )
    };
    if !auth.staff {
        return Err(refused());
    }
    let id: Uuid = requested
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(refused)?;
    let mut conn = state.pool.acquire().await?;
    let i =
        slate_events::impersonation::resolve(&mut conn, auth.account_id, id, chrono::Utc::now())
            .await?
            .ok_or_else(refused)?;
    let route = parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    slate_events::impersonation::record_request(&mut conn, &i, parts.method.as_str(), &route)
        .await?;
    if let Some(slot) = parts.extensions.get::<ImpersonationSlot>()
        && let Ok(mut s) = slot.0.lock()
    {
        *s = Some(format!(
            "staff={}; account={}; until={}",
            i.staff_id,
            i.account_id,
            i.expires_at.to_rfc3339()
        ));
    }
    Ok(Auth {
        account_id: i.account_id,
        key_id: auth.key_id,
        session_id: auth.session_id,
        staff: false,
        second_factor_pending: false,
        impersonator: Some(i.staff_id),
        impersonation_id: Some(i.impersonation_id),
        origin: auth.origin,
    })
}

/// A cookie's value from the request; none when the request carries the
/// name more than once. A page on a sibling subdomain can set a cookie of
/// the same name for this host (`Domain=` the parent, and a narrower
/// `Path`, which the browser sends first): read first-found, it signed the
/// browser into the session, or finished the sign-in, of the account that
/// page chose.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// A browser's request that changes something, sent from another site
/// (another origin): `Sec-Fetch-Site` says so where the browser sends it,
/// `Origin` otherwise. The session cookie is `SameSite=Lax`, which still
/// lets a sibling subdomain (the same site) send it with a form's POST.
/// Requests without either header (not from a browser's page) pass.
fn cross_site(parts: &Parts, public_url: &str) -> bool {
    use axum::http::Method;
    if matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    match header("origin") {
        Some(origin) => !public_url
            .strip_prefix(origin)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        None => false,
    }
}

/// Authenticate with a session cookie (browsers). Staff privileges need a
/// session that passed the second factor. A request that changes something
/// must come from this service's own pages ([`cross_site`]).
async fn from_session(parts: &Parts, state: &AppState) -> Result<Option<Auth>, ApiError> {
    let Some(token) = cookie(&parts.headers, slate_events::sessions::COOKIE) else {
        return Ok(None);
    };
    if cross_site(parts, &state.config.public_url) {
        return Err(ApiError::client(
            axum::http::StatusCode::FORBIDDEN,
            "cross_site_request",
            "a browser request from another site cannot use this session",
        ));
    }
    let mut conn = state.pool.acquire().await?;
    let idle = chrono::Duration::from_std(state.config.session_idle)
        .unwrap_or(chrono::Duration::minutes(30));
    let owner =
        slate_events::sessions::authenticate(&mut conn, token, idle, chrono::Utc::now()).await?;
    match owner {
        Some(o) => Ok(Some(Auth {
            account_id: o.account_id,
            key_id: None,
            session_id: Some(o.session_id),
            staff: o.staff && o.mfa_verified,
            second_factor_pending: o.staff && !o.mfa_verified,
            impersonator: None,
            impersonation_id: None,
            origin: Origin::of(parts)
                .sealed(&mut conn, o.account_id, o.data_key)
                .await?,
        })),
        None => {
            drop(conn);
            let route = parts
                .extensions
                .get::<axum::extract::MatchedPath>()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            if let Err(e) = slate_events::access::record_auth_failure(
                &state.appends,
                "unknown_or_ended_session",
                None,
                None,
                &route,
            )
            .await
            {
                tracing::warn!(error = %e, "could not record an authentication failure");
            }
            Err(ApiError::unauthorized())
        }
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            let auth = from_session(parts, state)
                .await?
                .ok_or_else(ApiError::unauthorized)?;
            return impersonate(parts, state, auth).await;
        };
        let mut conn = state
            .pool
            .acquire()
            .await
            .map_err(|e| ApiError::Internal(e.into()))?;
        let presented = bearer(header);
        let owner = match slate_events::access::authenticate(&mut conn, presented).await? {
            slate_events::access::Presented::Owner(owner) => owner,
            slate_events::access::Presented::Refused(refusal) => {
                // A credential was presented and refused: recorded, without it.
                let reason = if slate_events::access::has_valid_checksum(presented) {
                    "unknown_or_revoked_key"
                } else {
                    "malformed_credential"
                };
                let route = parts
                    .extensions
                    .get::<axum::extract::MatchedPath>()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_default();
                let ip = refusal.address(&mut conn, Origin::of(parts).ip).await;
                drop(conn);
                if let Err(e) = slate_events::access::record_auth_failure(
                    &state.appends,
                    reason,
                    refusal.key_prefix.as_deref(),
                    ip.as_deref(),
                    &route,
                )
                .await
                {
                    tracing::warn!(error = %e, "could not record an authentication failure");
                }
                tracing::info!(
                    reason,
                    key_prefix = slate_events::access::public_prefix(presented).unwrap_or("-"),
                    "authentication failed"
                );
                return Err(ApiError::unauthorized());
            }
        };
        tracing::Span::current().record("account_id", tracing::field::display(owner.account_id));
        let auth = Auth {
            account_id: owner.account_id,
            key_id: Some(owner.key_id),
            session_id: None,
            staff: owner.staff,
            second_factor_pending: false,
            impersonator: None,
            impersonation_id: None,
            origin: Origin::of(parts)
                .sealed(&mut conn, owner.account_id, owner.data_key)
                .await?,
        };
        drop(conn);
        impersonate(parts, state, auth).await
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

/// An authenticated staff account. Anyone else gets 403 (recorded).
#[derive(Debug, Clone)]
pub struct Staff(pub Auth);

impl FromRequestParts<AppState> for Staff {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let auth = Auth::from_request_parts(parts, state).await?;
        if auth.staff {
            return Ok(Staff(auth));
        }
        let route = parts
            .extensions
            .get::<axum::extract::MatchedPath>()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        // Under an impersonation the caller is its staff member, refused
        // because staff rights do not go with it: recorded against them.
        let caller = auth.impersonator.unwrap_or(auth.account_id);
        if let Err(e) =
            slate_events::access::record_access_denied(&state.appends, caller, &route).await
        {
            tracing::warn!(error = %e, "could not record an access denial");
        }
        Err(ApiError::forbidden())
    }
}
