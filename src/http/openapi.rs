//! The OpenAPI 3.1 document of the public API, generated from the handlers'
//! `#[utoipa::path]` annotations, and served at `GET /openapi.json`. The
//! checked-in copy is `docs/openapi.json` (`slate openapi` writes it,
//! `slate openapi --check` fails when it is stale).
//!
//! Success responses are annotated on the handlers. Error responses are added
//! here from one table ([`ERRORS`]) plus the errors every authenticated, JSON
//! body or query string operation shares, so each error response lists its
//! stable codes the same way: in its description and as `x-error-codes`.

use axum::Router;
use axum::routing::get;
use serde_json::{Value, json};
use utoipa::OpenApi;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(serve))
}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)),
)]
pub(super) async fn serve() -> axum::Json<Value> {
    axum::Json(document())
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Slate API",
        description = "Credits, generations and billing. Every error answers `{\"error\": {\"code\", \"message\", \"details\"?}}`: \
match on `code` (stable), show `message` (fixed text). Each error response lists the codes it can carry in its description \
and as `x-error-codes`; the schema `ErrorCode` lists every code with its meaning. New codes may be added: treat an unknown \
code by its HTTP status.",
    ),
    paths(
        serve,
        super::health::healthz,
        super::health::readyz,
        super::metrics::metrics,
        super::stripe::receive,
        super::billing::checkout,
        super::billing::portal,
        super::credits::balance,
        super::credits::ledger,
        super::generations::submit,
        super::generations::list,
        super::generations::read,
        super::generations::cancel,
        super::generations::events,
        super::generations::webhook_secret,
        super::keys::create,
        super::keys::list,
        super::keys::revoke,
        super::account::export,
        super::account::delete_account,
        super::sessions::start,
        super::sessions::callback,
        super::sessions::totp,
        super::sessions::list,
        super::sessions::end,
        super::sessions::revoke_all,
    ),
    components(schemas(schemas::ErrorBody)),
    tags(
        (name = "generations", description = "Submit, follow and cancel generations"),
        (name = "credits", description = "Balance and ledger"),
        (name = "billing", description = "Stripe Checkout and billing portal"),
        (name = "keys", description = "API keys"),
        (name = "sessions", description = "Browser sign-in (OpenID Connect), sessions and the second factor"),
        (name = "account", description = "Export and deletion of the account"),
        (name = "webhooks", description = "Inbound Stripe webhooks"),
        (name = "operations", description = "Health, readiness and metrics"),
        (name = "meta", description = "This document"),
    ),
)]
struct ApiDoc;

/// Operations whose body is read raw (not through the `Json` extractor).
const RAW_BODY: &[&str] = &["receive_stripe_webhook"];

/// The document as JSON (keys sorted, so it is stable byte for byte).
pub fn document() -> Value {
    let doc = ApiDoc::openapi();
    let mut doc = serde_json::to_value(&doc).expect("the OpenAPI document serializes");
    add_security_schemes(&mut doc);
    add_error_responses(&mut doc);
    omit_null_parameters(&mut doc);
    describe_event_streams(&mut doc);
    doc
}

/// A `text/event-stream` response is a sequence of events, each with an
/// `event` name, an `id` and a `data` line, and it is the `data` that holds
/// the JSON object utoipa was given as the body. OpenAPI 3.1 has no
/// `itemSchema` (3.2 does), so the schema is of one event, its `data` a
/// string whose content is that JSON (`contentMediaType` /
/// `contentSchema`), as 3.2's own example of Server-Sent Events has it.
/// The object as the whole schema told clients, and schemathesis, to expect
/// a `status` field on the event itself. (The API's one stream names every
/// event `status`.)
fn describe_event_streams(doc: &mut Value) {
    for_each_operation(doc, |op| {
        let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
            return;
        };
        for response in responses.values_mut() {
            let Some(stream) = response
                .pointer_mut("/content/text~1event-stream")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            let Some(data) = stream.get("schema").cloned() else {
                continue;
            };
            stream["schema"] = json!({
                "type": "object",
                "properties": {
                    "event": {"type": "string", "const": "status"},
                    "id": {"type": "string", "description": "Resume after it with `Last-Event-ID`."},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": data,
                    },
                },
                "required": ["event", "id", "data"],
            });
        }
    });
}

/// An optional query or header parameter is absent, never null: utoipa
/// types `Option<T>` as `[T, "null"]`, so drop the `"null"`.
fn omit_null_parameters(doc: &mut Value) {
    for_each_operation(doc, |op| {
        let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
            return;
        };
        for p in params {
            let Some(types) = p["schema"]["type"].as_array() else {
                continue;
            };
            let kept: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
            if let [t] = kept.as_slice() {
                p["schema"]["type"] = (*t).clone();
            }
        }
    });
}

/// Run `f` on every operation object of the document.
fn for_each_operation(doc: &mut Value, mut f: impl FnMut(&mut Value)) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        if let Some(item) = item.as_object_mut() {
            item.values_mut().for_each(&mut f);
        }
    }
}

/// `docs/openapi.json`: pretty, with a trailing newline.
pub fn pretty() -> String {
    let mut s = serde_json::to_string_pretty(&document()).expect("JSON serializes");
    s.push('\n');
    s
}

fn add_security_schemes(doc: &mut Value) {
    doc["components"]["securitySchemes"] = json!({
        "api_key": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "slate_live_…",
            "description": "An API key: `Authorization: Bearer slate_live_…` (`POST /v1/keys` issues more). A staff caller may add \
    `Slate-Impersonate: <impersonation id>` to act as an account; responses then carry `Slate-Impersonation`.",
        },
        "session_cookie": {
            "type": "apiKey",
            "in": "cookie",
            "name": slate_events::sessions::COOKIE,
            "description": "A browser session from the OpenID Connect sign-in (`GET /v1/auth/oidc/start`).",
        },
    });
}

/// The codes only the staff routes (`/admin/…`, not in the document) add to
/// `CODES`.
pub const STAFF_CODES: &[(&str, &str)] = &[
    (
        "forbidden",
        "the caller is not staff (the attempt is recorded)",
    ),
    (
        "invalid_impersonation",
        "an impersonation needs another live account and a reason of 3–500 characters",
    ),
    (
        "not_restorable",
        "the account is not deleted, or its 30 days have passed",
    ),
    ("invalid_format", "the export format is `jsonl` or `csv`"),
];

/// Every stable error code, with what it means.
pub const CODES: &[(&str, &str)] = &[
    (
        "metrics_token_invalid",
        "this server has a metrics token (`SLATE_METRICS_TOKEN`) and the request did not send it as `Authorization: Bearer <token>`",
    ),
    // Authentication and request format, shared by many routes.
    (
        "unauthorized",
        "no credential, or an unknown, revoked or malformed API key, or an unknown or ended session",
    ),
    (
        "impersonation_invalid",
        "`Slate-Impersonate` names no live impersonation of the staff caller (or the caller is not staff)",
    ),
    (
        "cross_site_request",
        "a request that changes something came with the session cookie from another site's page (`Sec-Fetch-Site`, or `Origin` against `SLATE_PUBLIC_URL`)",
    ),
    (
        "impersonation_forbidden",
        "not done as someone else: under an impersonation staff cannot issue API keys, read the webhook signing secret, delete the account, open the billing portal or a checkout, sign out everywhere, or pass the second factor",
    ),
    (
        "second_factor_required",
        "a staff account's browser session must pass the second factor (`POST /v1/auth/totp`) before it can issue API keys",
    ),
    (
        "database_unavailable",
        "the database could not be reached (down, restarting or saturated); nothing was done, retry after `Retry-After` seconds",
    ),
    (
        "internal_error",
        "an unexpected failure; the detail is in the server log under the request id (`x-request-id`)",
    ),
    (
        "method_not_allowed",
        "the route exists but does not take that HTTP method (405, with `Allow`)",
    ),
    ("invalid_json", "the body is not valid JSON"),
    (
        "invalid_query",
        "a query parameter is unknown (where a route lists its own), has the wrong type or value, or a required one is missing",
    ),
    (
        "invalid_body",
        "the body could not be read (400), or lacks the expected fields and types or has unknown ones (422)",
    ),
    (
        "unsupported_media_type",
        "send the body as `application/json`",
    ),
    ("payload_too_large", "the request body is too large"),
    (
        "request_timeout",
        "the request body did not arrive within `SLATE_REQUEST_READ_SECS` of the server's first read of it; the connection is closed",
    ),
    (
        "body_too_large",
        "the body exceeds 1 MiB on the one route whose bodies are being debug-logged (`SLATE_DEBUG_BODIES`)",
    ),
    (
        "not_found",
        "no such resource for this account (ids of other accounts answer the same)",
    ),
    // Generations.
    (
        "rate_limited",
        "too many generation submissions from this account or address, or second-factor attempts for this account; retry after `Retry-After` seconds",
    ),
    (
        "invalid_idempotency_key",
        "`Idempotency-Key` is 1-200 printable ASCII characters",
    ),
    (
        "idempotency_key_reused",
        "this `Idempotency-Key` was used with a different request",
    ),
    (
        "invalid_kind",
        "kind is one of video, voiceover, transcription, script",
    ),
    ("unknown_provider", "this provider is not available"),
    (
        "invalid_collection",
        "collection_id is 1-64 letters, digits, - or _",
    ),
    ("input_required", "a transcription needs input_key"),
    ("prompt_required", "this kind needs a prompt"),
    (
        "invalid_prompt",
        "the prompt is empty or longer than 4000 characters",
    ),
    (
        "invalid_input",
        "input_key must name one of your own objects",
    ),
    ("input_not_found", "input_key names no stored object"),
    (
        "storage_unavailable",
        "the storage could not be reached; nothing was done, retry later",
    ),
    (
        "invalid_parameters",
        "parameters must be an object; a video's duration is 1 to 60 seconds",
    ),
    ("invalid_deadline", "deadline_seconds must be positive"),
    (
        "model_not_offered",
        "this provider does not offer that model here (the operator's list: `FAL_MODELS`)",
    ),
    (
        "webhook_url_not_allowed",
        "webhook_url must be an http(s) URL resolving to a public address",
    ),
    (
        "prompt_rejected",
        "the prompt is not allowed; `details.category` says why",
    ),
    (
        "operation_not_priced",
        "this kind of generation has no approved price with this provider",
    ),
    (
        "insufficient_credits",
        "not enough credits; `details.available` and `details.shortfall` say how many",
    ),
    ("invalid_cursor", "the cursor is not one this API gave"),
    (
        "invalid_last_event_id",
        "`Last-Event-ID` is not an event id this stream gave",
    ),
    ("generation_finished", "the generation has already finished"),
    // Keys.
    ("invalid_label", "a label is at most 100 characters"),
    // Billing.
    ("invalid_quantity", "quantity must be between 1 and 100"),
    (
        "unknown_price",
        "the price is neither a configured credit pack nor a plan",
    ),
    (
        "no_billing_customer",
        "the account has not bought anything through Stripe yet",
    ),
    (
        "billing_not_configured",
        "payments are not configured on this deployment",
    ),
    (
        "payment_provider_unavailable",
        "Stripe could not be reached; retry shortly",
    ),
    // Stripe webhooks.
    (
        "signature_missing",
        "the Stripe-Signature header is missing",
    ),
    (
        "signature_malformed",
        "the Stripe-Signature header is malformed",
    ),
    ("signature_mismatch", "no signature matches the payload"),
    (
        "signature_timestamp_out_of_tolerance",
        "the signature timestamp is outside the tolerance",
    ),
    ("body_unparseable", "the body is not a Stripe event"),
    (
        "livemode_mismatch",
        "the event's livemode does not match this deployment",
    ),
    (
        "connected_account_event",
        "the event is a connected account's, not this account's",
    ),
    ("webhooks_not_configured", "no webhook secret is configured"),
    // Sign-in and sessions.
    (
        "sign_in_not_configured",
        "browser sign-in is not configured",
    ),
    (
        "identity_provider_unavailable",
        "the identity provider could not be reached",
    ),
    (
        "sign_in_state_invalid",
        "the sign-in attempt is unknown, already used or expired; start again",
    ),
    (
        "id_token_invalid",
        "the identity provider's token was refused",
    ),
    (
        "email_not_verified",
        "the identity provider has not verified this email",
    ),
    (
        "account_deleted",
        "this account was deleted and can no longer be restored",
    ),
    (
        "session_required",
        "the second factor is checked for a browser session, not an API key",
    ),
    ("totp_invalid", "the code is wrong, expired or already used"),
];

/// Error responses: (HTTP status, the stable codes it carries).
pub type Errors = &'static [(u16, &'static [&'static str])];

/// The errors of each operation beyond the shared ones (see
/// [`add_error_responses`]): operation id → (status, codes).
pub const ERRORS: &[(&str, Errors)] = &[
    ("openapi", &[]),
    ("healthz", &[]),
    ("readyz", &[]),
    (
        "metrics",
        &[
            (401, &["metrics_token_invalid"]),
            (500, &["internal_error"]),
            (503, &["database_unavailable"]),
        ],
    ),
    (
        "receive_stripe_webhook",
        &[
            (
                400,
                &[
                    "signature_missing",
                    "signature_malformed",
                    "signature_mismatch",
                    "signature_timestamp_out_of_tolerance",
                    "body_unparseable",
                    "livemode_mismatch",
                    "connected_account_event",
                ],
            ),
            (408, &["request_timeout"]),
            (413, &["payload_too_large", "body_too_large"]),
            (500, &["internal_error"]),
            (503, &["webhooks_not_configured", "database_unavailable"]),
        ],
    ),
    (
        "create_checkout_session",
        &[
            (403, &["impersonation_forbidden"]),
            (422, &["invalid_quantity", "unknown_price"]),
            (
                503,
                &["billing_not_configured", "payment_provider_unavailable"],
            ),
        ],
    ),
    (
        "create_portal_session",
        &[
            (403, &["impersonation_forbidden"]),
            (409, &["no_billing_customer"]),
            (
                503,
                &["billing_not_configured", "payment_provider_unavailable"],
            ),
        ],
    ),
    ("get_credits", &[]),
    ("list_ledger", &[]),
    (
        "submit_generation",
        &[
            (400, &["invalid_idempotency_key"]),
            (402, &["insufficient_credits"]),
            (409, &["idempotency_key_reused"]),
            (
                422,
                &[
                    "invalid_kind",
                    "unknown_provider",
                    "invalid_collection",
                    "input_required",
                    "prompt_required",
                    "invalid_prompt",
                    "invalid_input",
                    "input_not_found",
                    "invalid_parameters",
                    "invalid_deadline",
                    "model_not_offered",
                    "webhook_url_not_allowed",
                    "prompt_rejected",
                    "operation_not_priced",
                ],
            ),
            (429, &["rate_limited"]),
            (503, &["storage_unavailable"]),
        ],
    ),
    ("list_generations", &[(400, &["invalid_cursor"])]),
    ("get_generation", &[(404, &["not_found"])]),
    (
        "cancel_generation",
        &[(404, &["not_found"]), (409, &["generation_finished"])],
    ),
    (
        "follow_generation",
        &[(400, &["invalid_last_event_id"]), (404, &["not_found"])],
    ),
    ("get_webhook_secret", &[(403, &["impersonation_forbidden"])]),
    (
        "create_key",
        &[
            (403, &["impersonation_forbidden", "second_factor_required"]),
            (422, &["invalid_label"]),
        ],
    ),
    ("list_keys", &[]),
    ("revoke_key", &[(404, &["not_found"])]),
    ("export_account", &[(404, &["not_found"])]),
    ("delete_account", &[(403, &["impersonation_forbidden"])]),
    (
        "start_sign_in",
        &[
            (500, &["internal_error"]),
            (
                503,
                &[
                    "sign_in_not_configured",
                    "identity_provider_unavailable",
                    "database_unavailable",
                ],
            ),
        ],
    ),
    (
        "finish_sign_in",
        &[
            (
                401,
                &[
                    "sign_in_state_invalid",
                    "id_token_invalid",
                    "email_not_verified",
                ],
            ),
            (403, &["account_deleted"]),
            (500, &["internal_error"]),
            (
                503,
                &[
                    "sign_in_not_configured",
                    "identity_provider_unavailable",
                    "database_unavailable",
                ],
            ),
        ],
    ),
    (
        "verify_totp",
        &[
            (400, &["session_required"]),
            (401, &["totp_invalid"]),
            (403, &["impersonation_forbidden"]),
            (429, &["rate_limited"]),
        ],
    ),
    ("list_sessions", &[]),
    ("end_session", &[(404, &["not_found"])]),
    (
        "revoke_all_sessions",
        &[(403, &["impersonation_forbidden"])],
    ),
];

/// Errors of every authenticated operation.
const AUTH_ERRORS: Errors = &[
    (401, &["unauthorized"]),
    (403, &["impersonation_invalid", "cross_site_request"]),
    (500, &["internal_error"]),
    (503, &["database_unavailable"]),
];

/// Errors of every operation: another method on its path.
const COMMON_ERRORS: Errors = &[(405, &["method_not_allowed"])];

/// Errors of every operation with query parameters (the `Query` extractor).
const QUERY_ERRORS: Errors = &[(400, &["invalid_query"])];

/// Errors of every operation with a JSON body (the `Json` extractor).
const BODY_ERRORS: Errors = &[
    (400, &["invalid_json", "invalid_body"]),
    (408, &["request_timeout"]),
    (413, &["payload_too_large", "body_too_large"]),
    (415, &["unsupported_media_type"]),
    (422, &["invalid_body"]),
];

fn reason(status: u16) -> &'static str {
    axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

fn meaning(code: &str) -> &'static str {
    CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, m)| *m)
        .unwrap_or_else(|| panic!("error code {code} is not in openapi::CODES"))
}

/// Add each operation's error responses, a `Slate-Impersonate` header to the
/// authenticated ones, and the `ErrorCode` catalogue.
fn add_error_responses(doc: &mut Value) {
    let paths = doc["paths"]
        .as_object_mut()
        .expect("the document has paths");
    let mut seen = Vec::new();
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"))
                .to_owned();
            let own = ERRORS
                .iter()
                .find(|(o, _)| *o == id)
                .unwrap_or_else(|| panic!("operation {id} is missing from openapi::ERRORS"))
                .1;
            seen.push(id.clone());
            let mut by_status: std::collections::BTreeMap<u16, Vec<&'static str>> =
                Default::default();
            let mut add = |list: Errors| {
                for (status, codes) in list {
                    let entry = by_status.entry(*status).or_default();
                    for c in *codes {
                        if !entry.contains(c) {
                            entry.push(c);
                        }
                    }
                }
            };
            add(COMMON_ERRORS);
            if op.get("security").is_some() {
                add(AUTH_ERRORS);
                let params = op["parameters"]
                    .as_array_mut()
                    .map(std::mem::take)
                    .unwrap_or_default();
                op["parameters"] = Value::Array(params);
                op["parameters"]
                    .as_array_mut()
                    .expect("an array")
                    .push(json!({
                        "name": "Slate-Impersonate",
                        "in": "header",
                        "required": false,
                        "description": "Staff only: the id of a live impersonation of yours, to act as its account.",
                        "schema": { "type": "string", "format": "uuid" },
                    }));
            }
            if op["requestBody"]["content"]
                .get("application/json")
                .is_some()
                && !RAW_BODY.contains(&id.as_str())
            {
                add(BODY_ERRORS);
            }
            if op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["in"] == "query"))
            {
                add(QUERY_ERRORS);
            }
            add(own);
            let responses = op["responses"]
                .as_object_mut()
                .expect("every operation has responses");
            for (status, codes) in &by_status {
                responses.insert(status.to_string(), error_response(*status, codes));
            }
        }
    }
    for (id, _) in ERRORS {
        assert!(
            seen.iter().any(|s| s == id),
            "openapi::ERRORS names {id}, which is not an operation"
        );
    }
    let codes: Vec<&str> = CODES.iter().map(|(c, _)| *c).collect();
    let descriptions: Vec<&str> = CODES.iter().map(|(_, m)| *m).collect();
    doc["components"]["schemas"]["ErrorCode"] = json!({
        "type": "string",
        "description": "Every stable error code (`error.code`). Each error response lists the ones it can carry \
    (`x-error-codes`). More may be added: handle an unknown code by the HTTP status.",
        "enum": codes,
        "x-enum-descriptions": descriptions,
    });
}

fn error_response(status: u16, codes: &[&str]) -> Value {
    let list: Vec<String> = codes
        .iter()
        .map(|c| format!("`{c}`: {}", meaning(c)))
        .collect();
    let mut r = json!({
        "description": format!("{}. Error codes: {}.", reason(status), list.join("; ")),
        "x-error-codes": codes,
        "content": {
            "application/json": { "schema": { "$ref": "#/components/schemas/Error" } }
        },
    });
    if status == 429 {
        r["headers"] = json!({
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "schema": { "type": "integer" },
            }
        });
    }
    if status == 401 {
        r["headers"] = json!({
            "WWW-Authenticate": {
                "description": "`Bearer`.",
                "schema": { "type": "string" },
            }
        });
    }
    r
}

/// Every error code a route of this file set can return, from the source:
/// what the constructors of `ApiError` are given. (The test compares it with
/// the document.)
#[cfg(test)]
fn codes_in_source(source: &str) -> Vec<String> {
    let flat: String = source.split_whitespace().collect();
    let mut found = Vec::new();
    let mut literal_after = |marker: &str, skip_to_comma: bool| {
        let mut rest = flat.as_str();
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            let mut s = rest;
            if skip_to_comma {
                match s.find(',') {
                    Some(j) => s = &s[j + 1..],
                    None => break,
                }
            }
            if let Some(s) = s.strip_prefix('"')
                && let Some(end) = s.find('"')
            {
                found.push(s[..end].to_owned());
            }
        }
    };
    for m in [
        "bad_request(",
        "unprocessable(",
        "conflict(",
        "invalid(",
        "code:",
        "bad(",
    ] {
        literal_after(m, false);
    }
    literal_after("ApiError::client(", true);
    literal_after("Self::client(", true);
    found.sort();
    found.dedup();
    found
}

#[allow(dead_code)] // Documentation only: the handlers build these bodies with `json!`.
pub mod schemas {
    use chrono::{DateTime, Utc};
    use serde::Serialize;
    use serde_json::Value;
    use slate_events::access::KeyInfo;
    use slate_events::credits::LedgerEntry;
    use slate_events::sessions::SessionInfo;
    use utoipa::ToSchema;
    use uuid::Uuid;

    /// Every error response: `{"error": {"code", "message", "details"?}}`.
    #[derive(Serialize, ToSchema)]
    #[schema(as = Error)]
    pub struct ErrorBody {
        pub error: ErrorDetail,
    }

    #[derive(Serialize, ToSchema)]
    pub struct ErrorDetail {
        /// Stable and machine-readable (see `ErrorCode`); the response
        /// description lists the codes it can carry.
        pub code: String,
        /// Fixed text for people; do not parse it.
        pub message: String,
        /// Structured context for some codes: `insufficient_credits` has
        /// `available` and `shortfall`, `prompt_rejected` has `category`.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<Object>)]
        pub details: Option<Value>,
    }

    /// The process answers.
    #[derive(Serialize, ToSchema)]
    pub struct Health {
        #[schema(example = "ok")]
        pub status: String,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum ReadyStatus {
        Ready,
        Unavailable,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum CheckState {
        Ok,
        Timeout,
        Unreachable,
    }

    #[derive(Serialize, ToSchema)]
    pub struct ReadinessChecks {
        pub postgres: CheckState,
        pub redis: CheckState,
    }

    /// PostgreSQL and Redis answer (200), or not (503, same body).
    #[derive(Serialize, ToSchema)]
    pub struct Readiness {
        pub status: ReadyStatus,
        pub checks: ReadinessChecks,
    }

    #[derive(Serialize, ToSchema)]
    pub struct WebhookReceipt {
        pub received: bool,
        /// This event id had been received before (nothing new was done).
        pub duplicate: bool,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum CheckoutMode {
        /// A one-off credit pack.
        Payment,
        /// A plan.
        Subscription,
    }

    #[derive(Serialize, ToSchema)]
    pub struct CheckoutSession {
        /// The Stripe Checkout session id.
        pub id: String,
        /// Send the browser here.
        pub url: String,
        pub mode: CheckoutMode,
        /// Credits granted once paid.
        pub credits: i64,
    }

    #[derive(Serialize, ToSchema)]
    pub struct PortalSession {
        /// The Stripe billing portal; send the browser here.
        pub url: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct LedgerPage {
        /// Newest first.
        pub entries: Vec<LedgerEntry>,
        /// Pass as `cursor` for the next page; null on the last.
        pub next_cursor: Option<i64>,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum GenerationStatus {
        Queued,
        Running,
        Succeeded,
        Failed,
        Canceled,
    }

    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    pub enum GenerationKind {
        Video,
        Voiceover,
        Transcription,
        Script,
    }

    #[derive(Serialize, ToSchema)]
    pub struct GenerationOutput {
        /// Presigned, valid for 15 minutes; null if it could not be signed.
        pub url: Option<String>,
        pub expires_at: Option<DateTime<Utc>>,
        pub content_type: Option<String>,
        pub bytes: Option<i64>,
        pub width: Option<i32>,
        pub height: Option<i32>,
        pub duration_ms: Option<i64>,
        /// Where the output is stored, under the account's own prefix: give
        /// it as a transcription's `input_key`.
        pub key: String,
    }

    /// A generation as its owner sees it.
    #[derive(Serialize, ToSchema)]
    pub struct Generation {
        pub id: Uuid,
        pub kind: GenerationKind,
        pub provider: String,
        pub status: GenerationStatus,
        pub attempts: i32,
        /// Credits held, then charged on success.
        pub cost: i64,
        pub collection_id: String,
        pub cancel_requested: bool,
        pub deadline: Option<DateTime<Utc>>,
        /// Why a failed or canceled generation ended; null otherwise. Its
        /// credits are released either way. Canceled: `canceled` (its owner
        /// asked), `deadline_passed`, `account_deleted`. Failed, refused by
        /// the provider: `invalid_parameters`, `content_policy`, `not_found`
        /// (model, voice or task), `input_too_large`, `input_unavailable`
        /// (a transcription's input could not be fetched), `cancelled` (the
        /// task was cancelled at the provider, not here), `provider_error`
        /// (failed it, or answered in a shape not understood). Failed on our
        /// side of the provider: `unauthorized`, `quota_exceeded` (this
        /// service's account with the provider), and after the last attempt
        /// `provider_unavailable`, `provider_timeout`. Failed with its
        /// result: `output_too_large`, `output_refused` (an address that may
        /// not be fetched), `output_unavailable`. Failed here:
        /// `storage_unavailable`, `database_unavailable` (after the last
        /// attempt), `internal_error`, `job_lost` (its job stopped for good
        /// without an outcome). New codes may be added: treat an unknown one
        /// as `provider_error`.
        pub failure_code: Option<String>,
        /// Set once succeeded.
        pub output: Option<GenerationOutput>,
        pub created_at: DateTime<Utc>,
        pub updated_at: DateTime<Utc>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct GenerationPage {
        /// Newest first.
        pub data: Vec<Generation>,
        /// Pass as `cursor` for the next page; null on the last.
        pub next_cursor: Option<String>,
    }

    /// The `data` of each `status` event of the stream (JSON); the event id
    /// is the generation stream's version (resume with `Last-Event-ID`).
    #[derive(Serialize, ToSchema)]
    pub struct GenerationStatusEvent {
        pub status: GenerationStatus,
        /// The event type, e.g. `GenerationRequested`, `GenerationSucceeded`.
        pub event: String,
        pub at: DateTime<Utc>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub attempt: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub reason_code: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub reason: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub content_type: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub bytes: Option<i64>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct WebhookSecret {
        /// `whsec_…`.
        pub secret: String,
        /// How completion webhooks are signed.
        pub scheme: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct CreatedKey {
        pub id: Uuid,
        pub prefix: String,
        pub label: Option<String>,
        /// The key itself, `slate_live_…`: shown this once.
        pub key: String,
        pub note: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct KeyList {
        /// Newest first; revoked keys included.
        pub data: Vec<KeyInfo>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct AccountDeletion {
        pub account_id: Uuid,
        pub deleted: bool,
        /// Restorable (by signing in again) until then.
        pub purge_after: DateTime<Utc>,
        pub note: String,
    }

    /// Everything about the account, streamed as one JSON document.
    #[derive(Serialize, ToSchema)]
    pub struct AccountExport {
        pub exported_at: DateTime<Utc>,
        #[schema(value_type = Object)]
        pub account: Value,
        /// The account's events, personal fields opened.
        #[schema(value_type = Vec<Object>)]
        pub events: Vec<Value>,
        #[schema(value_type = Vec<Object>)]
        pub balance: Vec<Value>,
        #[schema(value_type = Vec<Object>)]
        pub ledger: Vec<Value>,
        /// With prompts, parameters and fresh presigned `output_url`s.
        #[schema(value_type = Vec<Object>)]
        pub generations: Vec<Value>,
        #[schema(value_type = Vec<Object>)]
        pub subscription: Vec<Value>,
        #[schema(value_type = Vec<Object>)]
        pub sessions: Vec<Value>,
        /// Prefixes and labels, never secrets.
        #[schema(value_type = Vec<Object>)]
        pub keys: Vec<Value>,
        #[schema(value_type = Vec<Object>)]
        pub audit: Vec<Value>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct SignedIn {
        pub account_id: Uuid,
        pub session_id: Uuid,
        pub expires_at: DateTime<Utc>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct SessionList {
        /// Live sessions, newest first.
        pub data: Vec<SessionInfo>,
        /// This request's session, if it came with one.
        pub current: Option<Uuid>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct TotpVerified {
        pub session_id: Uuid,
        pub mfa_verified: bool,
    }

    #[derive(Serialize, ToSchema)]
    pub struct SignedOutEverywhere {
        pub sessions_ended: u64,
        pub keys_revoked: u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_is_3_1_and_every_operation_has_an_id_and_documented_errors() {
        let doc = document();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, r) in op["responses"].as_object().unwrap() {
                    let json_error = r["content"]["application/json"]["schema"]["$ref"]
                        == "#/components/schemas/Error";
                    if status.starts_with('4') || status.starts_with('5') {
                        let codes = r["x-error-codes"].as_array();
                        assert!(
                            !json_error || codes.is_some_and(|c| !c.is_empty()),
                            "{method} {path} {status} lists no error codes"
                        );
                    }
                }
            }
        }
    }

    /// A new `ApiError` code in a public route's source must be documented.
    #[test]
    fn openapi_documents_every_error_code_in_the_source() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut source = String::new();
        for f in [
            "http/error.rs",
            "http/extract.rs",
            "http/debug_bodies.rs",
            "http/stripe.rs",
            "http/billing.rs",
            "http/credits.rs",
            "http/generations.rs",
            "http/keys.rs",
            "http/account.rs",
            "http/sessions.rs",
            "generations.rs",
        ] {
            source.push_str(&std::fs::read_to_string(dir.join(f)).unwrap());
        }
        // The codes some operation's error response lists.
        let doc = document();
        let mut listed = std::collections::BTreeSet::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for op in item.as_object().unwrap().values() {
                for r in op["responses"].as_object().unwrap().values() {
                    for c in r["x-error-codes"].as_array().into_iter().flatten() {
                        listed.insert(c.as_str().unwrap().to_owned());
                    }
                }
            }
        }
        let mut missing = Vec::new();
        let in_source = codes_in_source(&source);
        assert!(in_source.len() > 30, "the source scan finds too little");
        // `forbidden` is the staff extractor's, on /admin routes only; the
        // Stripe signature codes come from `SignatureError::code`.
        use crate::stripe::signature::SignatureError;
        let signature = [
            SignatureError::Missing,
            SignatureError::Malformed,
            SignatureError::NoMatch,
            SignatureError::OutOfTolerance,
        ]
        .map(SignatureError::code);
        let expected = in_source
            .iter()
            .map(String::as_str)
            .filter(|c| *c != "forbidden")
            .chain(signature)
            .chain(["internal_error"]);
        for code in expected {
            if !listed.contains(code) {
                missing.push(code.to_owned());
            }
        }
        assert!(missing.is_empty(), "undocumented error codes: {missing:?}");
        // And the catalogue has no code that no operation returns.
        for (code, _) in CODES {
            assert!(
                listed.contains(*code),
                "{code} is in CODES but no operation lists it"
            );
        }
    }

    #[test]
    fn openapi_documents_every_public_route() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
        let doc = document();
        let paths = doc["paths"].as_object().unwrap();
        for entry in std::fs::read_dir(dir).unwrap() {
            let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let flat: String = source.split_whitespace().collect();
            for piece in flat.split(".route(\"").skip(1) {
                let path = &piece[..piece.find('"').unwrap()];
                if path.starts_with("/admin") {
                    continue;
                }
                assert!(paths.contains_key(path), "route {path} is not documented");
            }
        }
    }
}
