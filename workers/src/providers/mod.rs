//! AI-provider adapters: one per provider, all over one shared `reqwest`
//! client, behind one `Provider` enum the generation worker calls.
//!
//! A call is `start` (submit; synchronous providers answer at once), then
//! `poll` with the handle `start` returned for queue providers, and `cancel`
//! (best effort). Errors are classified for the caller's retry policy:
//! `Transient` and `Timeout` are worth retrying, `Permanent` is not. Retrying
//! is the caller's job.
//!
//! Privacy: a request carries only what the provider needs (prompt or input,
//! and the validated parameters) — no identifier of our users, no
//! user-agent. Logs name the provider, the operation, status codes,
//! durations and provider request ids; never prompts, bodies, URLs with
//! signatures, or keys.

use std::fmt;
use std::time::{Duration, Instant};

use reqwest::{Response, StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub mod ark_chat;
pub mod elevenlabs;
pub mod fal;
pub mod local;
pub mod seedance;
pub mod whisper;

pub use ark_chat::ArkChatClient;
pub use elevenlabs::ElevenLabsClient;
pub use fal::FalClient;
pub use local::LocalProvider;
pub use seedance::SeedanceClient;
pub use whisper::WhisperClient;

/// What a generation makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Video,
    Voiceover,
    Transcription,
    Script,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Video => "video",
            Kind::Voiceover => "voiceover",
            Kind::Transcription => "transcription",
            Kind::Script => "script",
        }
    }
}

/// One call to a provider. `Debug` shows no prompt, URL or parameter value.
#[derive(Clone, PartialEq)]
pub struct ProviderRequest {
    pub kind: Kind,
    /// Text prompt / text to speak / chat prompt (for transcription: an
    /// optional vocabulary or style hint).
    pub prompt: Option<String>,
    /// Transcription: a URL the provider adapter can GET the audio from (a
    /// presigned S3 URL). Never forwarded to the provider itself.
    pub input_url: Option<String>,
    /// Provider-specific options (model, voice_id, duration, ratio,
    /// language…), validated by the adapter. `null` or an object.
    pub parameters: Value,
}

impl fmt::Debug for ProviderRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderRequest")
            .field("kind", &self.kind)
            .field(
                "prompt_chars",
                &self.prompt.as_ref().map(|p| p.chars().count()),
            )
            .field("has_input_url", &self.input_url.is_some())
            .finish_non_exhaustive()
    }
}

/// What a finished call produced.
#[derive(Clone, PartialEq, Eq)]
pub enum Output {
    /// Media to download from the provider (the worker streams it to S3).
    MediaUrl {
        url: String,
        content_type: Option<String>,
    },
    /// Media returned inline (e.g. ElevenLabs returns audio bytes).
    MediaBytes {
        bytes: Vec<u8>,
        content_type: String,
    },
    /// Text (script, transcript).
    Text { text: String },
}

impl Output {
    /// The content type, where known (`text/plain` for text).
    pub fn content_type(&self) -> Option<&str> {
        match self {
            Output::MediaUrl { content_type, .. } => content_type.as_deref(),
            Output::MediaBytes { content_type, .. } => Some(content_type),
            Output::Text { .. } => Some("text/plain; charset=utf-8"),
        }
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::MediaUrl { content_type, .. } => f
                .debug_struct("MediaUrl")
                .field("content_type", content_type)
                .finish_non_exhaustive(),
            Output::MediaBytes {
                bytes,
                content_type,
            } => f
                .debug_struct("MediaBytes")
                .field("len", &bytes.len())
                .field("content_type", content_type)
                .finish(),
            Output::Text { text } => f
                .debug_struct("Text")
                .field("chars", &text.chars().count())
                .finish(),
        }
    }
}

/// The answer to `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    Done(Output),
    /// `handle` is the provider's request/task id (for Fal, with the app
    /// id). The caller persists it so a restarted worker polls instead of
    /// resubmitting.
    Pending {
        handle: String,
    },
}

/// The answer to `poll`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    Running,
    Done(Output),
}

/// Stable codes of `ProviderError::Permanent`.
pub mod codes {
    /// The request's parameters, prompt or input are not acceptable.
    pub const INVALID_PARAMETERS: &str = "invalid_parameters";
    /// The provider refused the prompt, input or output on content grounds.
    pub const CONTENT_POLICY: &str = "content_policy";
    /// Our API key is missing, invalid or lacks access.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// Our account with the provider is out of quota or credit.
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    /// The provider does not know the request, task, model or voice.
    pub const NOT_FOUND: &str = "not_found";
    /// The input (transcription audio) is larger than the provider accepts.
    pub const INPUT_TOO_LARGE: &str = "input_too_large";
    /// The input URL answered with a client error (expired, missing).
    pub const INPUT_UNAVAILABLE: &str = "input_unavailable";
    /// The task was cancelled at the provider.
    pub const CANCELLED: &str = "cancelled";
    /// The provider failed the task for good, or answered in a shape we do
    /// not understand.
    pub const PROVIDER_ERROR: &str = "provider_error";
}

/// Why a provider call failed. Messages never carry prompts, bodies or keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// 5xx, 429, connection errors: retry with backoff.
    #[error("transient provider error: {0}")]
    Transient(String),
    /// Our per-call timeout elapsed: retry.
    #[error("provider call timed out")]
    Timeout,
    /// 4xx, content-policy refusal, bad parameters: fail at once.
    #[error("provider refused ({code}): {message}")]
    Permanent { code: &'static str, message: String },
}

impl ProviderError {
    pub fn permanent(code: &'static str, message: impl Into<String>) -> Self {
        ProviderError::Permanent {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::permanent(codes::INVALID_PARAMETERS, message)
    }

    /// Worth trying again later.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ProviderError::Permanent { .. })
    }

    /// A stable code: the permanent code, or `transient` / `timeout`.
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Transient(_) => "transient",
            ProviderError::Timeout => "timeout",
            ProviderError::Permanent { code, .. } => code,
        }
    }
}

/// The shared classification of an HTTP status that is not a success:
/// 408, 425, 429 and 5xx are transient; other 4xx (and unexpected 1xx/3xx)
/// are permanent, with a code by status. Adapters refine the code from the
/// provider's error body (content policy, quota).
pub fn classify(status: StatusCode) -> ProviderError {
    let transient = status.is_server_error()
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
        );
    if transient {
        return ProviderError::Transient(format!("HTTP {}", status.as_u16()));
    }
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => codes::INVALID_PARAMETERS,
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => codes::UNAUTHORIZED,
        StatusCode::PAYMENT_REQUIRED => codes::QUOTA_EXCEEDED,
        StatusCode::NOT_FOUND | StatusCode::GONE => codes::NOT_FOUND,
        StatusCode::PAYLOAD_TOO_LARGE => codes::INPUT_TOO_LARGE,
        _ => codes::PROVIDER_ERROR,
    };
    ProviderError::permanent(code, format!("HTTP {}", status.as_u16()))
}

/// An API key whose `Debug` prints nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(…)")
    }
}

/// Where and how to reach one provider.
#[derive(Debug, Clone)]
pub struct EndpointSettings {
    /// Overridable so tests (and whisper.cpp) point elsewhere; no trailing
    /// slash needed.
    pub base_url: String,
    pub api_key: Option<ApiKey>,
    /// Per HTTP call, connect to last body byte.
    pub timeout: Duration,
    /// The models users may ask for (`FAL_MODELS`, `ELEVENLABS_MODELS`, …),
    /// the first being the default; empty: only the provider's built-in
    /// default (see [`offered_model`]).
    pub models: Vec<String>,
}

impl EndpointSettings {
    pub fn new(base_url: impl Into<String>, api_key: Option<ApiKey>, timeout: Duration) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            timeout,
            models: Vec::new(),
        }
    }

    /// The same, offering these models (see [`EndpointSettings::models`]).
    pub fn with_models(mut self, models: Vec<String>) -> Self {
        self.models = models;
        self
    }
}

/// The price tier a generation's `parameters` ask for at `provider`,
/// beyond its kind and units: Seedance's resolution. Priced as the
/// operation `<kind>:<provider>:<tier>`, so a 1080p video is not sold at
/// the 480p price. Refused when the parameter is not one the provider
/// makes; checked at submission, and made by the provider as priced.
pub fn price_tier(
    provider: &str,
    parameters: &Value,
) -> Result<Option<&'static str>, ProviderError> {
    let empty = Map::new();
    let map = match parameters {
        Value::Object(m) => m,
        _ => &empty,
    };
    match provider {
        seedance::NAME => seedance::resolution(&Params(map)).map(Some),
        _ => Ok(None),
    }
}

/// The model `parameters` ask for under the first of `keys` present (the
/// default when none is), if it is offered: with no `models` listed, only
/// `default` is; with a list, any on it, its first being the default. Which
/// models run is the operator's choice: each has its own price at the
/// provider, and the service's price for the kind covers the ones listed.
pub(crate) fn offered_model(
    parameters: &Value,
    keys: &[&str],
    models: &[String],
    default: &str,
) -> Result<String, ProviderError> {
    let default = models.first().map_or(default, String::as_str);
    let asked = keys
        .iter()
        .find_map(|k| parameters.get(*k).filter(|v| !v.is_null()));
    let model = match asked {
        None => default,
        Some(Value::String(m)) => m.as_str(),
        Some(_) => return Err(ProviderError::invalid("model must be a string")),
    };
    let offered = if models.is_empty() {
        model == default
    } else {
        models.iter().any(|m| m == model)
    };
    if !offered {
        return Err(ProviderError::invalid("this model is not offered"));
    }
    Ok(model.to_owned())
}

/// Which providers exist in this process. A provider left `None` is not
/// offered (`Providers::get` returns `None`).
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub fal: Option<EndpointSettings>,
    pub elevenlabs: Option<EndpointSettings>,
    pub seedance: Option<EndpointSettings>,
    /// OpenAI or a whisper.cpp server (key optional).
    pub whisper: Option<EndpointSettings>,
    /// Ark chat (Doubao) for scripts.
    pub ark: Option<EndpointSettings>,
    /// The offline provider.
    pub local: bool,
}

impl Default for ProviderSettings {
    /// Only the local provider.
    fn default() -> Self {
        Self {
            fal: None,
            elevenlabs: None,
            seedance: None,
            whisper: None,
            ark: None,
            local: true,
        }
    }
}

/// A settings problem found at start.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{provider}: base URL is not an http(s) URL")]
    BaseUrl { provider: &'static str },
    #[error("{provider}: an API key is required")]
    MissingKey { provider: &'static str },
    #[error("{provider}: the API key has characters a header cannot carry")]
    BadKey { provider: &'static str },
    #[error("{provider}: the timeout must be more than zero")]
    Timeout { provider: &'static str },
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// One provider.
#[derive(Debug)]
pub enum Provider {
    Fal(FalClient),
    ElevenLabs(ElevenLabsClient),
    Seedance(SeedanceClient),
    Whisper(WhisperClient),
    ArkChat(ArkChatClient),
    Local(LocalProvider),
}

impl Provider {
    /// "fal", "elevenlabs", "seedance", "whisper", "ark", "local".
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Fal(_) => fal::NAME,
            Provider::ElevenLabs(_) => elevenlabs::NAME,
            Provider::Seedance(_) => seedance::NAME,
            Provider::Whisper(_) => whisper::NAME,
            Provider::ArkChat(_) => ark_chat::NAME,
            Provider::Local(_) => local::NAME,
        }
    }

    pub fn supports(&self, kind: Kind) -> bool {
        match self {
            Provider::Fal(_) | Provider::Seedance(_) => kind == Kind::Video,
            Provider::ElevenLabs(_) => kind == Kind::Voiceover,
            Provider::Whisper(_) => kind == Kind::Transcription,
            Provider::ArkChat(_) => kind == Kind::Script,
            Provider::Local(_) => true,
        }
    }

    /// Whether the provider offers the model `parameters` ask for (where
    /// the model is the operator's choice to make: Fal's names any app on
    /// Fal, at any price, answering with any address). Checked at
    /// submission, and again when the job starts.
    pub fn offers_model(&self, parameters: &Value) -> bool {
        match self {
            Provider::Fal(c) => c.model(parameters).is_ok(),
            Provider::ElevenLabs(c) => c.model(parameters).is_ok(),
            Provider::Seedance(c) => c.model(parameters).is_ok(),
            Provider::Whisper(c) => c.model(parameters).is_ok(),
            Provider::ArkChat(c) => c.model(parameters).is_ok(),
            Provider::Local(_) => true,
        }
    }

    /// Submit. Synchronous providers answer `Done`; queue providers answer
    /// `Pending` with the handle to poll.
    pub async fn start(&self, req: &ProviderRequest) -> Result<Started, ProviderError> {
        if !self.supports(req.kind) {
            return Err(ProviderError::invalid(format!(
                "{} does not make {}",
                self.name(),
                req.kind.as_str()
            )));
        }
        match self {
            Provider::Fal(c) => c.start(req).await,
            Provider::ElevenLabs(c) => c.start(req).await.map(Started::Done),
            Provider::Seedance(c) => c.start(req).await,
            Provider::Whisper(c) => c.start(req).await.map(Started::Done),
            Provider::ArkChat(c) => c.start(req).await.map(Started::Done),
            Provider::Local(c) => c.start(req).await,
        }
    }

    pub async fn poll(&self, handle: &str) -> Result<Polled, ProviderError> {
        match self {
            Provider::Fal(c) => c.poll(handle).await,
            Provider::Seedance(c) => c.poll(handle).await,
            Provider::Local(c) => c.poll(handle),
            Provider::ElevenLabs(_) | Provider::Whisper(_) | Provider::ArkChat(_) => {
                Err(ProviderError::permanent(
                    codes::NOT_FOUND,
                    format!("{} answers synchronously; nothing to poll", self.name()),
                ))
            }
        }
    }

    /// Best effort; `Ok(())` where the provider has no cancel, or when the
    /// request already finished.
    pub async fn cancel(&self, handle: &str) -> Result<(), ProviderError> {
        match self {
            Provider::Fal(c) => c.cancel(handle).await,
            Provider::Seedance(c) => c.cancel(handle).await,
            Provider::Local(c) => {
                c.cancel(handle);
                Ok(())
            }
            Provider::ElevenLabs(_) | Provider::Whisper(_) | Provider::ArkChat(_) => Ok(()),
        }
    }
}

/// The providers of this process, built once from `ProviderSettings`.
#[derive(Debug)]
pub struct Providers {
    providers: Vec<Provider>,
}

impl Providers {
    pub fn new(settings: &ProviderSettings) -> Result<Self, SettingsError> {
        // No user-agent, no default headers, no proxy from the environment,
        // no redirects (a redirect could carry a key header elsewhere).
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut providers = Vec::new();
        if let Some(s) = &settings.fal {
            providers.push(Provider::Fal(FalClient::new(client.clone(), s)?));
        }
        if let Some(s) = &settings.elevenlabs {
            providers.push(Provider::ElevenLabs(ElevenLabsClient::new(
                client.clone(),
                s,
            )?));
        }
        if let Some(s) = &settings.seedance {
            providers.push(Provider::Seedance(SeedanceClient::new(client.clone(), s)?));
        }
        if let Some(s) = &settings.whisper {
            providers.push(Provider::Whisper(WhisperClient::new(client.clone(), s)?));
        }
        if let Some(s) = &settings.ark {
            providers.push(Provider::ArkChat(ArkChatClient::new(client.clone(), s)?));
        }
        if settings.local {
            providers.push(Provider::Local(LocalProvider::new()));
        }
        Ok(Self { providers })
    }

    pub fn get(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.name() == name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.providers.iter().map(Provider::name)
    }
}

// ---------------------------------------------------------------------------
// Shared plumbing of the HTTP adapters.

/// One provider's HTTP side: the shared client, its base URL, key and
/// timeout, and the logging and error mapping every call goes through.
#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) provider: &'static str,
    pub(crate) client: reqwest::Client,
    pub(crate) base: Url,
    /// The key's header, ready to send (marked sensitive), if there is a key.
    auth: reqwest::header::HeaderMap,
    pub(crate) timeout: Duration,
}

/// How a provider wants its key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyStyle {
    pub(crate) header: &'static str,
    pub(crate) prefix: &'static str,
    pub(crate) required: bool,
}

impl KeyStyle {
    pub(crate) const BEARER: KeyStyle = KeyStyle {
        header: "authorization",
        prefix: "Bearer ",
        required: true,
    };
}

impl fmt::Debug for Http {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http")
            .field("provider", &self.provider)
            .field("base", &self.base.as_str())
            .field("key", &(!self.auth.is_empty()).then_some("…"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Largest JSON answer we read.
pub(crate) const MAX_JSON_BYTES: usize = 4 << 20;
/// Largest error body we read (to find the provider's error code).
const MAX_ERROR_BYTES: usize = 64 << 10;

impl Http {
    pub(crate) fn new(
        provider: &'static str,
        client: reqwest::Client,
        settings: &EndpointSettings,
        key: KeyStyle,
    ) -> Result<Self, SettingsError> {
        let mut base = Url::parse(settings.base_url.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or(SettingsError::BaseUrl { provider })?;
        // Paths are appended to the base, so it ends with exactly one '/'.
        let path = format!("{}/", base.path().trim_end_matches('/'));
        base.set_path(&path);
        base.set_query(None);
        let mut auth = reqwest::header::HeaderMap::new();
        match settings
            .api_key
            .as_ref()
            .filter(|k| !k.expose().trim().is_empty())
        {
            Some(k) => {
                let mut value = reqwest::header::HeaderValue::from_str(&format!(
                    "{}{}",
                    key.prefix,
                    k.expose().trim()
                ))
                .map_err(|_| SettingsError::BadKey { provider })?;
                // Sensitive: never shown in the request's Debug output.
                value.set_sensitive(true);
                auth.insert(key.header, value);
            }
            None if key.required => return Err(SettingsError::MissingKey { provider }),
            None => {}
        }
        if settings.timeout.is_zero() {
            return Err(SettingsError::Timeout { provider });
        }
        Ok(Self {
            provider,
            client,
            base,
            auth,
            timeout: settings.timeout,
        })
    }

    /// `base` + `path` (a relative path of already-validated segments).
    pub(crate) fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        let joined = format!("{}{}", url.path(), path.trim_start_matches('/'));
        url.set_path(&joined);
        url
    }

    /// The key header (none when there is no key).
    pub(crate) fn auth(&self) -> reqwest::header::HeaderMap {
        self.auth.clone()
    }

    /// Send with the per-call timeout; log provider, operation, status,
    /// duration and the provider's request id.
    pub(crate) async fn send(
        &self,
        op: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Response, ProviderError> {
        let started = Instant::now();
        let result = request.timeout(self.timeout).send().await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let request_id = provider_request_id(&response);
                tracing::info!(
                    provider = self.provider,
                    op,
                    status,
                    elapsed_ms,
                    request_id = request_id.as_deref().unwrap_or(""),
                    "provider call"
                );
                Ok(response)
            }
            Err(e) => {
                let err = transport_error(e);
                tracing::warn!(
                    provider = self.provider,
                    op,
                    elapsed_ms,
                    error = %err,
                    "provider call failed"
                );
                Err(err)
            }
        }
    }

    /// The error for a non-success response, refined by the adapter's
    /// reading of the provider's error body.
    pub(crate) async fn failure(
        &self,
        op: &'static str,
        response: Response,
        read: fn(&Value) -> ErrorDetail,
    ) -> ProviderError {
        let status = response.status();
        let body = read_capped(response, MAX_ERROR_BYTES)
            .await
            .unwrap_or_default();
        let detail = serde_json::from_slice::<Value>(&body)
            .map(|v| read(&v))
            .unwrap_or_default();
        let err = detail.apply(status, classify(status));
        tracing::warn!(
            provider = self.provider,
            op,
            status = status.as_u16(),
            code = err.code(),
            provider_code = detail.code.as_deref().unwrap_or(""),
            "provider refused"
        );
        err
    }

    /// Read a successful JSON answer (size-capped).
    pub(crate) async fn json<T: serde::de::DeserializeOwned>(
        &self,
        response: Response,
    ) -> Result<T, ProviderError> {
        let body = read_capped(response, MAX_JSON_BYTES).await?;
        serde_json::from_slice(&body).map_err(|e| {
            ProviderError::permanent(
                codes::PROVIDER_ERROR,
                format!(
                    "{}: unexpected answer ({})",
                    self.provider,
                    json_problem(&e)
                ),
            )
        })
    }
}

/// What kind of JSON problem, without serde's message (which can quote
/// values from the body).
fn json_problem(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "io",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "missing or mistyped fields",
        serde_json::error::Category::Eof => "truncated JSON",
    }
}

/// The provider's request id, from the headers providers use for it.
fn provider_request_id(response: &Response) -> Option<String> {
    [
        "x-request-id",
        "request-id",
        "x-fal-request-id",
        "x-client-request-id",
    ]
    .iter()
    .find_map(|h| response.headers().get(*h))
    .and_then(|v| v.to_str().ok())
    .map(|s| s.chars().take(128).collect())
}

/// A transport failure: our timeout, or a connection/protocol error. The
/// URL is dropped from the message (presigned URLs carry signatures).
pub(crate) fn transport_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        return ProviderError::Timeout;
    }
    let what = if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading the answer failed"
    } else if e.is_builder() {
        // Not retryable: the request itself cannot be built.
        return ProviderError::permanent(codes::INVALID_PARAMETERS, "request could not be built");
    } else {
        "request failed"
    };
    let mut message = what.to_owned();
    let mut source = std::error::Error::source(&e);
    // The innermost cause names the problem (reset, refused, TLS…).
    while let Some(s) = source {
        if s.source().is_none() {
            message = format!("{what}: {s}");
        }
        source = s.source();
    }
    ProviderError::Transient(truncate(&message, 200))
}

/// Read a body up to `limit` bytes; more is `input_too_large`.
pub(crate) async fn read_capped(
    mut response: Response,
    limit: usize,
) -> Result<Vec<u8>, ProviderError> {
    if let Some(len) = response.content_length()
        && len > limit as u64
    {
        return Err(too_large(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > limit {
            return Err(too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large(limit: usize) -> ProviderError {
    ProviderError::permanent(
        codes::INPUT_TOO_LARGE,
        format!("answer larger than {} bytes", limit),
    )
}

/// What an adapter read from a provider's error body.
#[derive(Debug, Default, Clone)]
pub(crate) struct ErrorDetail {
    /// The provider's machine-readable code, for logs.
    pub(crate) code: Option<String>,
    /// Short human-readable message (truncated; never the request body).
    pub(crate) message: Option<String>,
    /// A more precise permanent code than the status gives.
    pub(crate) refined: Option<&'static str>,
}

impl ErrorDetail {
    /// Refine a permanent classification. Transient stays transient (a
    /// content refusal never comes with a 5xx), except a 429 that says our
    /// account is out of quota (OpenAI's `insufficient_quota`): waiting
    /// does not fix that.
    fn apply(&self, status: StatusCode, err: ProviderError) -> ProviderError {
        let err = match err {
            ProviderError::Transient(message)
                if status == StatusCode::TOO_MANY_REQUESTS
                    && self.refined == Some(codes::QUOTA_EXCEEDED) =>
            {
                ProviderError::permanent(codes::QUOTA_EXCEEDED, message)
            }
            other => other,
        };
        match err {
            ProviderError::Permanent { code, message } => {
                let code = self.refined.unwrap_or(code);
                let message = match (&self.code, &self.message) {
                    (Some(c), Some(m)) => format!("{message}: {c}: {m}"),
                    (Some(c), None) => format!("{message}: {c}"),
                    (None, Some(m)) => format!("{message}: {m}"),
                    (None, None) => message,
                };
                ProviderError::permanent(code, truncate(&message, 300))
            }
            ProviderError::Transient(message) => ProviderError::Transient(match &self.code {
                Some(c) => truncate(&format!("{message}: {c}"), 200),
                None => message,
            }),
            other => other,
        }
    }
}

/// A provider error code that names a content-policy refusal (Ark's
/// `…SensitiveContentDetected…`/`…RiskDetection`, Fal's
/// `content_policy_violation`, moderation flags).
pub(crate) fn is_content_policy_code(code: &str) -> bool {
    let c = code.to_ascii_lowercase();
    [
        "content_policy",
        "sensitive",
        "riskdetection",
        "moderation",
        "safety",
        "flagged",
    ]
    .iter()
    .any(|m| c.contains(m))
}

/// Refine by a provider error code.
pub(crate) fn refine_code(code: &str) -> Option<&'static str> {
    let c = code.to_ascii_lowercase();
    if is_content_policy_code(&c) {
        Some(codes::CONTENT_POLICY)
    } else if c.contains("quota") || c.contains("overdue") || c.contains("insufficient_balance") {
        Some(codes::QUOTA_EXCEEDED)
    } else if c.contains("api_key") || c.contains("authentication") || c.contains("unauthorized") {
        Some(codes::UNAUTHORIZED)
    } else if c.contains("not_found") || c.contains("notfound") {
        Some(codes::NOT_FOUND)
    } else {
        None
    }
}

pub(crate) fn truncate(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max_chars).collect();
        t.push('…');
        t
    }
}

pub(crate) fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

// ---------------------------------------------------------------------------
// Parameter validation shared by the adapters.

/// The request's parameters as an object (`null` is an empty one); keys
/// outside `allowed` are refused, so typos fail at once instead of being
/// silently dropped, and nothing unexpected is forwarded.
pub(crate) fn parameters<'a>(
    req: &'a ProviderRequest,
    allowed: &[&str],
) -> Result<Params<'a>, ProviderError> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    let map = match &req.parameters {
        Value::Null => EMPTY.get_or_init(Map::new),
        Value::Object(m) => m,
        _ => return Err(ProviderError::invalid("parameters must be a JSON object")),
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ProviderError::invalid(format!(
            "unknown parameter {:?} (expected one of: {})",
            truncate(unknown, 40),
            allowed.join(", ")
        )));
    }
    Ok(Params(map))
}

/// Typed access to validated parameters.
pub(crate) struct Params<'a>(pub(crate) &'a Map<String, Value>);

impl Params<'_> {
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<&str>, ProviderError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.trim())),
            Some(_) => Err(ProviderError::invalid(format!(
                "{key} must be a non-empty string"
            ))),
        }
    }

    /// A string made only of ASCII letters, digits and `allowed_punct`
    /// (for values that go into URL paths or commands).
    pub(crate) fn token(
        &self,
        key: &str,
        allowed_punct: &str,
        max_len: usize,
    ) -> Result<Option<&str>, ProviderError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        if is_token(s, allowed_punct, max_len) {
            Ok(Some(s))
        } else {
            Err(ProviderError::invalid(format!(
                "{key} has characters or a length that is not allowed"
            )))
        }
    }

    pub(crate) fn integer(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, ProviderError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        // Accept 5 and "5" (several UIs send strings).
        let n = v
            .as_i64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()));
        match n {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(ProviderError::invalid(format!(
                "{key} must be an integer from {} to {}",
                range.start(),
                range.end()
            ))),
        }
    }

    pub(crate) fn number(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<f64>,
    ) -> Result<Option<f64>, ProviderError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(ProviderError::invalid(format!(
                "{key} must be a number from {} to {}",
                range.start(),
                range.end()
            ))),
        }
    }

    pub(crate) fn boolean(&self, key: &str) -> Result<Option<bool>, ProviderError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ProviderError::invalid(format!(
                "{key} must be true or false"
            ))),
        }
    }

    pub(crate) fn one_of<'v>(
        &self,
        key: &str,
        values: &[&'v str],
    ) -> Result<Option<&'v str>, ProviderError> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        values
            .iter()
            .find(|v| v.eq_ignore_ascii_case(s))
            .copied()
            .map(Some)
            .ok_or_else(|| {
                ProviderError::invalid(format!("{key} must be one of: {}", values.join(", ")))
            })
    }
}

pub(crate) fn is_token(s: &str, allowed_punct: &str, max_len: usize) -> bool {
    !s.is_empty()
        && s.len() <= max_len
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || allowed_punct.contains(c))
}

/// The prompt, required and non-blank.
pub(crate) fn required_prompt<'a>(
    req: &'a ProviderRequest,
    what: &str,
) -> Result<&'a str, ProviderError> {
    req.prompt
        .as_deref()
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| ProviderError::invalid(format!("{what} is required")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_by_status() {
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE),
            ProviderError::Transient(_)
        ));
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS),
            ProviderError::Transient(_)
        ));
        assert_eq!(
            classify(StatusCode::BAD_REQUEST).code(),
            codes::INVALID_PARAMETERS
        );
        assert_eq!(
            classify(StatusCode::UNPROCESSABLE_ENTITY).code(),
            codes::INVALID_PARAMETERS
        );
        assert_eq!(
            classify(StatusCode::UNAUTHORIZED).code(),
            codes::UNAUTHORIZED
        );
        assert_eq!(classify(StatusCode::NOT_FOUND).code(), codes::NOT_FOUND);
        assert_eq!(
            classify(StatusCode::PAYMENT_REQUIRED).code(),
            codes::QUOTA_EXCEEDED
        );
        assert_eq!(classify(StatusCode::FOUND).code(), codes::PROVIDER_ERROR);
    }

    #[test]
    fn debug_hides_secrets_and_prompts() {
        let key = ApiKey::new("sk-very-secret");
        assert!(!format!("{key:?}").contains("secret"));
        let req = ProviderRequest {
            kind: Kind::Script,
            prompt: Some("my private idea".into()),
            input_url: Some("https://s3/users/u1/x?X-Amz-Signature=abc".into()),
            parameters: serde_json::json!({"model": "m"}),
        };
        let shown = format!("{req:?}");
        assert!(!shown.contains("private") && !shown.contains("Signature"));
        let out = Output::Text {
            text: "transcript of someone".into(),
        };
        assert!(!format!("{out:?}").contains("someone"));
    }

    const OPTIONAL: KeyStyle = KeyStyle {
        required: false,
        ..KeyStyle::BEARER
    };

    #[test]
    fn base_url_joins_paths() {
        let client = reqwest::Client::new();
        for base in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/prefix",
            "http://h:1/prefix/",
        ] {
            let s = EndpointSettings::new(base, None, Duration::from_secs(1));
            let http = Http::new("t", client.clone(), &s, OPTIONAL).unwrap();
            let url = http.url("/v1/x");
            assert!(url.as_str().ends_with("/v1/x"), "{url}");
            assert!(!url.as_str().contains("//v1"), "{url}");
        }
        let bad = EndpointSettings::new("ftp://h", None, Duration::from_secs(1));
        assert!(Http::new("t", client.clone(), &bad, OPTIONAL).is_err());
        let keyless = EndpointSettings::new("http://h", None, Duration::from_secs(1));
        assert!(matches!(
            Http::new("t", client, &keyless, KeyStyle::BEARER),
            Err(SettingsError::MissingKey { .. })
        ));
    }

    #[test]
    fn kind_serializes_snake_case() {
        assert_eq!(serde_json::to_value(Kind::Voiceover).unwrap(), "voiceover");
        assert_eq!(
            serde_json::from_value::<Kind>("transcription".into()).unwrap(),
            Kind::Transcription
        );
    }

    #[test]
    fn only_listed_models_are_offered_and_the_first_is_the_default() {
        use serde_json::json;
        let none: Vec<String> = Vec::new();
        let listed = vec!["b-1".to_owned(), "c-2".to_owned()];
        let ask = |p: serde_json::Value, models: &[String]| {
            offered_model(&p, &["model_id", "model"], models, "a-0").map_err(|e| e.to_string())
        };
        assert_eq!(ask(json!({}), &none), Ok("a-0".into()));
        assert_eq!(ask(json!({"model": "a-0"}), &none), Ok("a-0".into()));
        assert!(ask(json!({"model": "b-1"}), &none).is_err());
        assert_eq!(ask(json!({}), &listed), Ok("b-1".into()));
        assert_eq!(ask(json!({"model": null}), &listed), Ok("b-1".into()));
        assert_eq!(ask(json!({"model": "c-2"}), &listed), Ok("c-2".into()));
        assert_eq!(
            ask(json!({"model_id": "c-2", "model": "x"}), &listed),
            Ok("c-2".into())
        );
        assert!(
            ask(json!({"model": "a-0"}), &listed).is_err(),
            "the built-in default is not listed"
        );
        assert!(ask(json!({"model": 3}), &listed).is_err());
    }
}
