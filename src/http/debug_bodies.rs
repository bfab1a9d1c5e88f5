//! `SLATE_DEBUG_BODIES=<route>` (a route template such as `/v1/generations`):
//! log that one route's JSON request and response bodies at debug level
//! (target `slate::bodies`), scrubbed first. Every other route, every body
//! that is not JSON, and Stripe's webhook deliveries are never logged.

use axum::body::{Body, to_bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::{ApiError, AppState};

/// Larger bodies on the debugged route are refused rather than buffered.
const LIMIT: usize = 1 << 20;

const SCRUBBED: &str = "[scrubbed]";

/// Field names whose values are personal or secret, wherever they appear.
const SENSITIVE: &[&str] = &[
    "prompt",
    "text",
    "transcript",
    "output",
    "email",
    "secret",
    "key",
    "token",
    "password",
    "cookie",
    "authorization",
    "signature",
    "url",
    // Personal data in Stripe's objects (customer details, billing details).
    "name",
    "phone",
    "address",
];

/// Field names scrubbed in request bodies only: a client's one-time code
/// (`/v1/auth/totp`). In responses `code` is the error's stable code.
const SENSITIVE_IN_REQUESTS: &[&str] = &["code"];

/// Fields whose every string is scrubbed, whatever its name: a generation's
/// provider parameters can hold free text under any name.
const FREE_TEXT: &[&str] = &["parameters"];

/// Value prefixes of secrets (ours and Stripe's), scrubbed under any name.
const SECRET_PREFIXES: &[&str] = &["slate_live_", "sk_", "rk_", "whsec_", "re_", "sealed:"];

/// Which way a body travels: a few field names are secret only one way.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

/// The body as scrubbed JSON, or a note saying it was not logged.
pub fn scrub(bytes: &[u8], direction: Direction) -> String {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(mut v) => {
            scrub_value(&mut v, direction);
            v.to_string()
        }
        Err(_) if bytes.is_empty() => "<empty>".into(),
        Err(_) => format!("<{} bytes, not JSON, not logged>", bytes.len()),
    }
}

fn sensitive(key: &str, direction: Direction) -> bool {
    let k = key.to_ascii_lowercase();
    SENSITIVE.iter().any(|s| k.contains(s))
        || (direction == Direction::Request && SENSITIVE_IN_REQUESTS.contains(&k.as_str()))
}

fn scrub_value(v: &mut Value, direction: Direction) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if sensitive(k, direction) && !val.is_null() {
                    *val = Value::String(SCRUBBED.into());
                } else if FREE_TEXT.contains(&k.as_str()) {
                    scrub_strings(val);
                } else {
                    scrub_value(val, direction);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| scrub_value(v, direction)),
        Value::String(s) if SECRET_PREFIXES.iter().any(|p| s.starts_with(p)) => {
            *s = SCRUBBED.into();
        }
        _ => {}
    }
}

/// Every string inside `v`, at any depth; numbers, booleans and the shape stay.
fn scrub_strings(v: &mut Value) {
    match v {
        Value::String(s) => *s = SCRUBBED.into(),
        Value::Array(items) => items.iter_mut().for_each(scrub_strings),
        Value::Object(map) => map.values_mut().for_each(scrub_strings),
        _ => {}
    }
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Routes whose bodies are never logged, even when named: Stripe's
/// deliveries carry customers' details in more places than [`SENSITIVE`]
/// names (tax ids, card fingerprints, free-text metadata).
const NEVER: &[&str] = &["/webhooks/stripe"];

pub async fn log_bodies(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = match (
        state.config.debug_bodies.as_deref(),
        req.extensions().get::<MatchedPath>(),
    ) {
        (Some(wanted), Some(m)) if m.as_str() == wanted && !NEVER.contains(&wanted) => {
            wanted.to_owned()
        }
        _ => return next.run(req).await,
    };
    let (parts, body) = req.into_parts();
    let Ok(bytes) = to_bytes(body, LIMIT).await else {
        return ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is too large",
        )
        .into_response();
    };
    tracing::debug!(target: "slate::bodies", %route, body = %scrub(&bytes, Direction::Request), "request body");
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if !is_json(response.headers()) {
        tracing::debug!(target: "slate::bodies", %route, status = response.status().as_u16(), "response body not JSON, not logged");
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, LIMIT).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    tracing::debug!(target: "slate::bodies", %route, status = parts.status.as_u16(), body = %scrub(&bytes, Direction::Response), "response body");
    Response::from_parts(parts, Body::from(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personal_and_secret_fields_are_scrubbed_everywhere() {
        let body = br#"{"kind":"video","prompt":"a violet lighthouse","parameters":{"seed":3,"negative_text":"x","style":"in the manner of a letter to Ann","loop":true,"shots":[{"caption":"Ann's house","seconds":4}]},
            "webhook_url":"https://example.com/h","items":[{"email":"a@b.c"},{"note":"whsec_abc"}],"key":null}"#;
        let out: Value = serde_json::from_str(&scrub(body, Direction::Request)).unwrap();
        assert_eq!(out["kind"], "video");
        assert_eq!(out["prompt"], SCRUBBED);
        assert_eq!(out["parameters"]["seed"], 3);
        assert_eq!(out["parameters"]["negative_text"], SCRUBBED);
        // Free text under any name in the parameters; the shape and the
        // numbers stay.
        assert_eq!(out["parameters"]["style"], SCRUBBED);
        assert_eq!(out["parameters"]["loop"], true);
        assert_eq!(out["parameters"]["shots"][0]["caption"], SCRUBBED);
        assert_eq!(out["parameters"]["shots"][0]["seconds"], 4);
        assert_eq!(out["webhook_url"], SCRUBBED);
        assert_eq!(out["items"][0]["email"], SCRUBBED);
        assert_eq!(out["items"][1]["note"], SCRUBBED);
        assert!(out["key"].is_null());
        assert_eq!(
            scrub(b"not json", Direction::Request),
            "<8 bytes, not JSON, not logged>"
        );
    }

    #[test]
    fn a_one_time_code_is_scrubbed_in_requests_and_an_error_code_kept_in_responses() {
        let out: Value =
            serde_json::from_str(&scrub(br#"{"code":"492039"}"#, Direction::Request)).unwrap();
        assert_eq!(out["code"], SCRUBBED);
        let out: Value = serde_json::from_str(&scrub(
            br#"{"code":"totp_invalid","message":"that code is not valid"}"#,
            Direction::Response,
        ))
        .unwrap();
        assert_eq!(out["code"], "totp_invalid");
    }

    #[test]
    fn personal_data_in_stripe_objects_is_scrubbed() {
        let body = br#"{"id":"evt_1","type":"checkout.session.completed","data":{"object":{"id":"cs_1","amount_total":2000,
            "customer_details":{"email":"a@b.c","name":"Ann Example","phone":"+15555550100",
            "address":{"line1":"1 Main St","city":"Springfield","postal_code":"12345","country":"US"}}}}}"#;
        let out: Value = serde_json::from_str(&scrub(body, Direction::Request)).unwrap();
        let details = &out["data"]["object"]["customer_details"];
        for field in ["email", "name", "phone", "address"] {
            assert_eq!(details[field], SCRUBBED, "{field}");
        }
        assert_eq!(out["data"]["object"]["amount_total"], 2000);
        assert_eq!(out["type"], "checkout.session.completed");
    }
}
