//! A fake Fal.ai queue API for the soak, shaped like the real one
//! (`workers/src/providers/fal.rs`): `POST /{model}` → `{request_id,
//! status_url, response_url, cancel_url}`; `GET /{owner}/{app}/requests/{id}/status`;
//! `GET /{owner}/{app}/requests/{id}` → `{video: {url, content_type}}`;
//! `PUT …/cancel`; and the media itself under `/files/{id}.mp4`.
//!
//! Each generation's behaviour is its `parameters.scenario` (the adapter
//! passes parameters through as the model's input); "once" behaviours are
//! counted per prompt, which carries the generation's unique key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// What the fake does for one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scenario {
    /// Done after about a second.
    Ok,
    /// Done after several seconds (likely to span a SIGKILL: the restarted
    /// worker must poll the recorded handle, not submit again).
    Slow,
    /// 503 on the first submit and 500 on the first status poll.
    Flaky,
    /// 422 content-policy refusal at submit: fails for good, refunded.
    FailSubmit,
    /// Completes with a model error: fails for good, refunded.
    FailModel,
    /// The first status poll hangs (past the adapter's timeout).
    HangOnce,
    /// The first submit hangs (nothing is created).
    HangSubmitOnce,
    /// Every call hangs; submitted with a deadline, so it ends canceled.
    HangDeadline,
    /// Every call hangs, no deadline: fails after the last attempt.
    HangForever,
    /// The local provider (a script): no fake involved.
    Local,
}

impl Scenario {
    pub const ALL: [Scenario; 10] = [
        Scenario::Ok,
        Scenario::Slow,
        Scenario::Flaky,
        Scenario::FailSubmit,
        Scenario::FailModel,
        Scenario::HangOnce,
        Scenario::HangSubmitOnce,
        Scenario::HangDeadline,
        Scenario::HangForever,
        Scenario::Local,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ok => "ok",
            Scenario::Slow => "slow",
            Scenario::Flaky => "flaky",
            Scenario::FailSubmit => "fail_submit",
            Scenario::FailModel => "fail_model",
            Scenario::HangOnce => "hang_once",
            Scenario::HangSubmitOnce => "hang_submit_once",
            Scenario::HangDeadline => "hang_deadline",
            Scenario::HangForever => "hang_forever",
            Scenario::Local => "local",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }

    /// Can this scenario end in success at all?
    pub fn can_succeed(self) -> bool {
        !matches!(
            self,
            Scenario::FailSubmit
                | Scenario::FailModel
                | Scenario::HangDeadline
                | Scenario::HangForever
        )
    }
}

/// How long a hanging call hangs (far past the adapter's 30 s timeout).
const HANG: Duration = Duration::from_secs(600);

struct Request {
    scenario: Scenario,
    created: Instant,
    status_polls: u32,
}

#[derive(Default)]
struct Inner {
    requests: HashMap<String, Request>,
    submits_by_prompt: HashMap<String, u32>,
    next_id: u64,
}

/// Counters the summary prints.
#[derive(Debug, Default, Clone)]
pub struct FakeStats {
    pub submits: u64,
    pub status_polls: u64,
    pub results: u64,
    pub downloads: u64,
    pub cancels: u64,
    pub hangs: u64,
    /// Prompts (generations) that were accepted by the provider more than
    /// once: a restarted worker paid twice.
    pub accepted_twice: u64,
    /// Their prompts (each carries its submission's key), with when the
    /// provider first accepted them.
    pub twice: Vec<(String, Instant)>,
}

#[derive(Clone)]
pub struct FakeFal {
    inner: Arc<Mutex<Inner>>,
    stats: Arc<Mutex<FakeStats>>,
    /// Prompt → (times accepted, when first accepted).
    accepted_by_prompt: Arc<Mutex<HashMap<String, (u32, Instant)>>>,
    base: Arc<String>,
}

impl FakeFal {
    pub fn new(base: String) -> Self {
        Self {
            inner: Arc::default(),
            stats: Arc::default(),
            accepted_by_prompt: Arc::default(),
            base: Arc::new(base),
        }
    }

    pub fn stats(&self) -> FakeStats {
        self.stats.lock().expect("not poisoned").clone()
    }

    pub fn router(&self) -> Router {
        Router::new().fallback(handle).with_state(self.clone())
    }

    fn count(&self, f: impl FnOnce(&mut FakeStats)) {
        f(&mut self.stats.lock().expect("not poisoned"));
    }
}

async fn hang(fal: &FakeFal) -> Response {
    fal.count(|s| s.hangs += 1);
    tokio::time::sleep(HANG).await;
    StatusCode::GATEWAY_TIMEOUT.into_response()
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

async fn handle(State(fal): State<FakeFal>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().trim_start_matches('/').to_owned();
    let parts: Vec<&str> = path.split('/').collect();
    match (method, parts.as_slice()) {
        (Method::GET, ["files", file]) => {
            fal.count(|s| s.downloads += 1);
            let id = file.trim_end_matches(".mp4");
            // Bytes that look like an MP4 box header; the worker stores them.
            let mut bytes = b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2".to_vec();
            bytes.extend(id.bytes().cycle().take(4096));
            ([("content-type", "video/mp4")], bytes).into_response()
        }
        (Method::GET, [_, _, "requests", id, "status"]) => status(&fal, id).await,
        (Method::GET, [owner, app, "requests", id]) => {
            fal.count(|s| s.results += 1);
            let known = fal
                .inner
                .lock()
                .expect("not poisoned")
                .requests
                .contains_key(*id);
            if !known {
                return json_response(StatusCode::NOT_FOUND, json!({"detail": "not found"}));
            }
            let _ = (owner, app);
            json_response(
                StatusCode::OK,
                json!({"video": {
                    "url": format!("{}/files/{id}.mp4", fal.base),
                    "content_type": "video/mp4",
                    "file_name": "output.mp4",
                    "file_size": 4120
                }}),
            )
        }
        (Method::PUT, [_, _, "requests", _, "cancel"]) => {
            fal.count(|s| s.cancels += 1);
            json_response(StatusCode::OK, json!({"status": "CANCELLATION_REQUESTED"}))
        }
        (Method::POST, [owner, app, ..]) => submit(&fal, owner, app, &body).await,
        _ => json_response(StatusCode::NOT_FOUND, json!({"detail": "not found"})),
    }
}

async fn submit(fal: &FakeFal, owner: &str, app: &str, body: &[u8]) -> Response {
    fal.count(|s| s.submits += 1);
    let Ok(input) = serde_json::from_slice::<Value>(body) else {
        return json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"detail": [{"loc": ["body"], "msg": "invalid JSON", "type": "value_error"}]}),
        );
    };
    let prompt = input["prompt"].as_str().unwrap_or_default().to_owned();
    let scenario = input["scenario"]
        .as_str()
        .and_then(Scenario::from_name)
        .unwrap_or(Scenario::Ok);
    let nth = {
        let mut inner = fal.inner.lock().expect("not poisoned");
        let n = inner.submits_by_prompt.entry(prompt.clone()).or_insert(0);
        *n += 1;
        *n
    };
    match scenario {
        Scenario::Flaky if nth == 1 => {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"detail": "temporarily overloaded"}),
            );
        }
        Scenario::HangSubmitOnce if nth == 1 => return hang(fal).await,
        Scenario::HangDeadline | Scenario::HangForever => return hang(fal).await,
        Scenario::FailSubmit => {
            return json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"detail": [{"loc": ["body", "prompt"], "msg": "flagged by the safety checker", "type": "content_policy_violation"}]}),
            );
        }
        _ => {}
    }
    let id = {
        let mut inner = fal.inner.lock().expect("not poisoned");
        inner.next_id += 1;
        let id = format!("chaos-{:08}", inner.next_id);
        inner.requests.insert(
            id.clone(),
            Request {
                scenario,
                created: Instant::now(),
                status_polls: 0,
            },
        );
        id
    };
    {
        let mut accepted = fal.accepted_by_prompt.lock().expect("not poisoned");
        let (n, first) = accepted
            .entry(prompt.clone())
            .or_insert((0, Instant::now()));
        *n += 1;
        if *n == 2 {
            let p = (prompt.clone(), *first);
            fal.count(|s| {
                s.accepted_twice += 1;
                s.twice.push(p);
            });
        }
    }
    let url = format!("{}/{owner}/{app}/requests/{id}", fal.base);
    json_response(
        StatusCode::OK,
        json!({
            "request_id": id,
            "response_url": url,
            "status_url": format!("{url}/status"),
            "cancel_url": format!("{url}/cancel"),
            "queue_position": 0
        }),
    )
}

async fn status(fal: &FakeFal, id: &str) -> Response {
    fal.count(|s| s.status_polls += 1);
    let (scenario, age, polls) = {
        let mut inner = fal.inner.lock().expect("not poisoned");
        let Some(r) = inner.requests.get_mut(id) else {
            return json_response(StatusCode::NOT_FOUND, json!({"detail": "not found"}));
        };
        r.status_polls += 1;
        (r.scenario, r.created.elapsed(), r.status_polls)
    };
    match scenario {
        Scenario::Flaky if polls == 1 => {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"detail": "internal error"}),
            );
        }
        Scenario::HangOnce if polls == 1 => return hang(fal).await,
        _ => {}
    }
    let ready_after = match scenario {
        Scenario::Slow => Duration::from_secs(6),
        _ => Duration::from_millis(800),
    };
    if age < ready_after {
        let status = if polls == 1 {
            "IN_QUEUE"
        } else {
            "IN_PROGRESS"
        };
        return json_response(
            StatusCode::ACCEPTED,
            json!({"status": status, "queue_position": 0, "logs": null}),
        );
    }
    if scenario == Scenario::FailModel {
        return json_response(
            StatusCode::OK,
            json!({"status": "COMPLETED", "error": "the model failed to render the clip", "error_type": "generation_failed"}),
        );
    }
    json_response(
        StatusCode::OK,
        json!({"status": "COMPLETED", "logs": null, "metrics": {"inference_time": 0.8}}),
    )
}
