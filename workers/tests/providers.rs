//! The provider adapters against wiremock fakes shaped like the real APIs:
//! success, transient and permanent failures, our timeout, queue polling and
//! cancel, and what each request carries (path, auth, body — and nothing
//! that identifies our users).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use slate_workers::media;
use slate_workers::providers::{
    ApiKey, EndpointSettings, Kind, Output, Polled, Provider, ProviderError, ProviderRequest,
    ProviderSettings, Providers, Started, codes, local,
};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const KEY: &str = "test-provider-key-9d1c";
/// Identifiers the caller knows about but must never reach a provider.
const USER_MARKER: &str = "acct-7f3a91c2";
const GENERATION_MARKER: &str = "gen-0b5e44d8";
const MARKERS: &[&str] = &[USER_MARKER, GENERATION_MARKER, "person@example.com"];
/// Headers an adapter may send; anything else (user-agent, tracing or
/// account headers) fails the test.
const ALLOWED_HEADERS: &[&str] = &[
    "host",
    "accept",
    "content-type",
    "content-length",
    "authorization",
    "xi-api-key",
];

fn endpoint(server: &MockServer, timeout: Duration) -> EndpointSettings {
    EndpointSettings::new(server.uri(), Some(ApiKey::new(KEY)), timeout)
}

fn providers(configure: impl FnOnce(&mut ProviderSettings)) -> Providers {
    let mut settings = ProviderSettings {
        local: false,
        ..ProviderSettings::default()
    };
    configure(&mut settings);
    Providers::new(&settings).expect("settings are valid")
}

fn request(kind: Kind, prompt: &str, parameters: Value) -> ProviderRequest {
    ProviderRequest {
        kind,
        prompt: Some(prompt.to_owned()),
        input_url: None,
        parameters,
    }
}

fn permanent_code(err: &ProviderError) -> &'static str {
    match err {
        ProviderError::Permanent { code, .. } => code,
        other => panic!("expected a permanent error, got {other:?}"),
    }
}

/// Every request the adapter sent: only allowed headers, no user agent, no
/// marker anywhere (line, headers, body), the key nowhere but its header.
async fn assert_nothing_identifying(server: &MockServer, skip_path_prefix: Option<&str>) {
    let received = server.received_requests().await.expect("recording is on");
    assert!(!received.is_empty());
    for r in received
        .iter()
        .filter(|r| skip_path_prefix.is_none_or(|p| !r.url.path().starts_with(p)))
    {
        for (name, _) in r.headers.iter() {
            assert!(
                ALLOWED_HEADERS.contains(&name.as_str()),
                "{} {} sent header {name}",
                r.method,
                r.url.path()
            );
        }
        let mut everything = format!("{} {}\n", r.method, r.url);
        for (name, value) in r.headers.iter() {
            if name != "authorization" && name != "xi-api-key" {
                everything.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("")));
            }
        }
        everything.push_str(&String::from_utf8_lossy(&r.body));
        for marker in MARKERS.iter().chain([&KEY]) {
            assert!(
                !everything.contains(marker),
                "{} {} carries {marker}",
                r.method,
                r.url.path()
            );
        }
    }
}

fn requests_to<'a>(received: &'a [Request], p: &str) -> Vec<&'a Request> {
    received.iter().filter(|r| r.url.path() == p).collect()
}

// ---------------------------------------------------------------------------
// Fal.ai queue

const FAL_MODEL: &str = "fal-ai/kling-video/v2.1/master/text-to-video";
const FAL_REQUEST_ID: &str = "764cabcf-b745-4b3e-ae38-1200304cf45b";

fn fal_base(server: &MockServer) -> String {
    format!(
        "{}/fal-ai/kling-video/requests/{FAL_REQUEST_ID}",
        server.uri()
    )
}

async fn fal_submit_ok(server: &MockServer) {
    let base = fal_base(server);
    Mock::given(method("POST"))
        .and(path(format!("/{FAL_MODEL}")))
        .and(header("authorization", format!("Key {KEY}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": "IN_QUEUE",
            "request_id": FAL_REQUEST_ID,
            "response_url": base,
            "status_url": format!("{base}/status"),
            "cancel_url": format!("{base}/cancel"),
            "queue_position": 0
        })))
        .mount(server)
        .await;
}

async fn fal_status(server: &MockServer, status: &str, http: u16, times: Option<u64>) {
    let mut body = json!({
        "status": status,
        "request_id": FAL_REQUEST_ID,
        "response_url": fal_base(server),
        "status_url": format!("{}/status", fal_base(server)),
        "cancel_url": format!("{}/cancel", fal_base(server)),
        "logs": null
    });
    if status == "IN_QUEUE" {
        body["queue_position"] = json!(2);
    }
    let mock = Mock::given(method("GET"))
        .and(path(format!(
            "/fal-ai/kling-video/requests/{FAL_REQUEST_ID}/status"
        )))
        .and(header("authorization", format!("Key {KEY}").as_str()))
        .respond_with(ResponseTemplate::new(http).set_body_json(body));
    match times {
        Some(n) => mock.up_to_n_times(n).mount(server).await,
        None => mock.mount(server).await,
    }
}

fn fal(server: &MockServer, timeout: Duration) -> Providers {
    providers(|s| s.fal = Some(endpoint(server, timeout)))
}

#[tokio::test]
async fn fal_queue_pending_running_done() {
    let server = MockServer::start().await;
    fal_submit_ok(&server).await;
    fal_status(&server, "IN_QUEUE", 202, Some(1)).await;
    fal_status(&server, "IN_PROGRESS", 202, Some(1)).await;
    fal_status(&server, "COMPLETED", 200, None).await;
    Mock::given(method("GET"))
        .and(path(format!(
            "/fal-ai/kling-video/requests/{FAL_REQUEST_ID}"
        )))
        .and(header("authorization", format!("Key {KEY}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "video": {
                "url": "https://v3.fal.media/files/tiger/a1b2c3_output.mp4",
                "content_type": "video/mp4",
                "file_name": "output.mp4",
                "file_size": 4_521_337
            }
        })))
        .expect(1)
        .mount(&server)
        .await;

    let providers = fal(&server, Duration::from_secs(5));
    let fal = providers.get("fal").expect("configured");
    assert!(fal.supports(Kind::Video) && !fal.supports(Kind::Voiceover));
    let req = request(
        Kind::Video,
        "a tiger walks through tall grass at dawn",
        json!({"model": FAL_MODEL, "duration": "5", "aspect_ratio": "16:9"}),
    );
    let handle = match fal.start(&req).await.unwrap() {
        Started::Pending { handle } => handle,
        other => panic!("expected Pending, got {other:?}"),
    };
    assert_eq!(
        handle,
        format!("fal-ai/kling-video/requests/{FAL_REQUEST_ID}")
    );
    assert_eq!(fal.poll(&handle).await.unwrap(), Polled::Running);
    assert_eq!(fal.poll(&handle).await.unwrap(), Polled::Running);
    // A restarted worker polls with the persisted handle on a new client.
    let restarted = self::fal(&server, Duration::from_secs(5));
    let done = restarted.get("fal").unwrap().poll(&handle).await.unwrap();
    assert_eq!(
        done,
        Polled::Done(Output::MediaUrl {
            url: "https://v3.fal.media/files/tiger/a1b2c3_output.mp4".into(),
            content_type: Some("video/mp4".into()),
        })
    );

    let received = server.received_requests().await.unwrap();
    let submit = requests_to(&received, &format!("/{FAL_MODEL}"));
    assert_eq!(submit.len(), 1);
    assert_eq!(
        submit[0].body_json::<Value>().unwrap(),
        json!({"prompt": "a tiger walks through tall grass at dawn", "duration": "5", "aspect_ratio": "16:9"}),
        "the model's input, and nothing else"
    );
    assert_eq!(
        requests_to(
            &received,
            &format!("/fal-ai/kling-video/requests/{FAL_REQUEST_ID}/status")
        )
        .len(),
        3
    );
    assert_nothing_identifying(&server, None).await;
}

#[tokio::test]
async fn fal_default_model_and_derived_handle() {
    let server = MockServer::start().await;
    // An answer without response_url: the handle is derived from the model.
    Mock::given(method("POST"))
        .and(path(format!(
            "/{}",
            slate_workers::providers::fal::DEFAULT_MODEL
        )))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"request_id": FAL_REQUEST_ID})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let providers = fal(&server, Duration::from_secs(5));
    let started = providers
        .get("fal")
        .unwrap()
        .start(&request(Kind::Video, "waves", Value::Null))
        .await
        .unwrap();
    assert_eq!(
        started,
        Started::Pending {
            handle: format!("fal-ai/kling-video/requests/{FAL_REQUEST_ID}")
        }
    );
}

#[tokio::test]
async fn fal_transient_failures() {
    for (status, body) in [
        (
            503,
            json!({"detail": "No runner available", "error_type": "runner_scheduling_failure"}),
        ),
        (429, json!({"detail": "Too many requests"})),
        (
            500,
            json!({"detail": "Internal error", "error_type": "internal_error"}),
        ),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
        let providers = fal(&server, Duration::from_secs(5));
        let err = providers
            .get("fal")
            .unwrap()
            .start(&request(Kind::Video, "a cat", Value::Null))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::Transient(_)),
            "{status}: {err:?}"
        );
        assert!(err.is_retryable());
    }
}

#[tokio::test]
async fn fal_permanent_failures() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{FAL_MODEL}")))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "detail": [{
                "loc": ["body", "duration"],
                "msg": "Input should be '5' or '10'",
                "type": "enum",
                "ctx": {"expected": "'5' or '10'"}
            }]
        })))
        .mount(&server)
        .await;
    let providers = fal(&server, Duration::from_secs(5));
    let fal = providers.get("fal").unwrap();
    let req = request(
        Kind::Video,
        "a cat",
        json!({"model": FAL_MODEL, "duration": 7}),
    );
    let err = fal.start(&req).await.unwrap_err();
    assert_eq!(permanent_code(&err), codes::INVALID_PARAMETERS, "{err}");
    assert!(!err.is_retryable());

    // Refused at the model: the status says COMPLETED, the result says why.
    fal_status(&server, "COMPLETED", 200, None).await;
    Mock::given(method("GET"))
        .and(path(format!("/fal-ai/kling-video/requests/{FAL_REQUEST_ID}")))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "detail": [{
                "loc": ["body", "prompt"],
                "msg": "The content could not be processed because it contained material flagged by a content checker.",
                "type": "content_policy_violation",
                "url": "https://docs.fal.ai/errors#content_policy_violation"
            }]
        })))
        .mount(&server)
        .await;
    let err = fal
        .poll(&format!("fal-ai/kling-video/requests/{FAL_REQUEST_ID}"))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::CONTENT_POLICY, "{err}");

    // Bad credentials.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(json!({"detail": "Invalid API key"})),
        )
        .mount(&server)
        .await;
    let err = self::fal(&server, Duration::from_secs(5))
        .get("fal")
        .unwrap()
        .start(&request(Kind::Video, "a cat", Value::Null))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::UNAUTHORIZED);
}

/// Only the operator's Fal models run (`FAL_MODELS`, the first the
/// default); with none listed, only the built-in default. A model id names
/// any app on Fal, at its own price, answering with any result address.
#[test]
fn fal_offers_only_the_operators_models() {
    let server_uri = "http://127.0.0.1:9";
    let build = |models: Vec<String>| {
        Providers::new(&ProviderSettings {
            fal: Some(
                EndpointSettings::new(server_uri, Some(ApiKey::new(KEY)), Duration::from_secs(5))
                    .with_models(models),
            ),
            ..ProviderSettings::default()
        })
        .unwrap()
    };
    let offers =
        |providers: &Providers, params: Value| providers.get("fal").unwrap().offers_model(&params);
    let builtin = build(Vec::new());
    assert!(offers(&builtin, json!({})));
    assert!(offers(&builtin, json!({"model": FAL_MODEL})));
    assert!(!offers(&builtin, json!({"model": "fal-ai/veo3"})));
    let listed = build(vec!["fal-ai/minimax/video-01".into(), FAL_MODEL.into()]);
    assert!(offers(&listed, json!({})));
    assert!(offers(&listed, json!({"model": FAL_MODEL})));
    assert!(offers(&listed, json!({"model": "fal-ai/minimax/video-01"})));
    assert!(!offers(&listed, json!({"model": "someone/pricey-app"})));
    assert!(!offers(&listed, json!({"model": 7})));
}

#[tokio::test]
async fn fal_refuses_bad_input_without_calling() {
    let server = MockServer::start().await;
    let providers = fal(&server, Duration::from_secs(5));
    let fal = providers.get("fal").unwrap();
    for (prompt, params) in [
        ("a cat", json!({"model": "../../admin"})),
        ("a cat", json!({"model": 7})),
        // Well formed, but not offered: another account's app on Fal.
        ("a cat", json!({"model": "someone/pricey-app"})),
        ("a cat", json!({"prompt": "another"})),
        ("a cat", json!(["not", "an", "object"])),
        ("   ", Value::Null),
    ] {
        let err = fal
            .start(&request(Kind::Video, prompt, params))
            .await
            .unwrap_err();
        assert_eq!(permanent_code(&err), codes::INVALID_PARAMETERS);
    }
    let err = fal
        .start(&request(Kind::Script, "a cat", Value::Null))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::INVALID_PARAMETERS);
    let err = fal.poll("not/a/handle").await.unwrap_err();
    assert_eq!(permanent_code(&err), codes::NOT_FOUND);
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn fal_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"request_id": FAL_REQUEST_ID}))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let providers = fal(&server, Duration::from_millis(300));
    let started = Instant::now();
    let err = providers
        .get("fal")
        .unwrap()
        .start(&request(Kind::Video, "a cat", Value::Null))
        .await
        .unwrap_err();
    assert_eq!(err, ProviderError::Timeout);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn fal_cancel_calls_the_cancel_endpoint() {
    let server = MockServer::start().await;
    let cancel = format!("/fal-ai/kling-video/requests/{FAL_REQUEST_ID}/cancel");
    Mock::given(method("PUT"))
        .and(path(cancel.as_str()))
        .and(header("authorization", format!("Key {KEY}").as_str()))
        .respond_with(
            ResponseTemplate::new(202).set_body_json(json!({"status": "CANCELLATION_REQUESTED"})),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("PUT"))
        .and(path(cancel.as_str()))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(json!({"status": "ALREADY_COMPLETED"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let providers = fal(&server, Duration::from_secs(5));
    let fal = providers.get("fal").unwrap();
    let handle = format!("fal-ai/kling-video/requests/{FAL_REQUEST_ID}");
    fal.cancel(&handle).await.unwrap();
    // Too late to cancel is not an error: there is nothing left to stop.
    fal.cancel(&handle).await.unwrap();
    assert_nothing_identifying(&server, None).await;
}

// ---------------------------------------------------------------------------
// ElevenLabs

const VOICE: &str = "21m00Tcm4TlvDq8ikWAM";

/// MPEG1 layer III frames at 128 kbps / 44.1 kHz (silence-ish): real enough
/// for the probe.
fn mp3_bytes(frames: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..frames {
        out.extend([0xff, 0xfb, 0x90, 0x00]);
        out.extend(vec![0u8; 413]);
    }
    out
}

fn elevenlabs(server: &MockServer, timeout: Duration) -> Providers {
    providers(|s| s.elevenlabs = Some(endpoint(server, timeout)))
}

#[tokio::test]
async fn elevenlabs_returns_audio_bytes() {
    let server = MockServer::start().await;
    let audio = mp3_bytes(50);
    Mock::given(method("POST"))
        .and(path(format!("/v1/text-to-speech/{VOICE}")))
        .and(query_param("output_format", "mp3_44100_128"))
        .and(header("xi-api-key", KEY))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(audio.clone(), "audio/mpeg")
                .insert_header("request-id", "el-req-123"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let providers = elevenlabs(&server, Duration::from_secs(5));
    let el = providers.get("elevenlabs").unwrap();
    assert!(el.supports(Kind::Voiceover) && !el.supports(Kind::Video));
    let req = request(
        Kind::Voiceover,
        "Welcome to the show.",
        json!({
            "voice_id": VOICE,
            "model_id": "eleven_multilingual_v2",
            "voice_settings": {"stability": 0.5, "similarity_boost": 0.75}
        }),
    );
    let out = match el.start(&req).await.unwrap() {
        Started::Done(out) => out,
        other => panic!("synchronous provider answered {other:?}"),
    };
    let Output::MediaBytes {
        bytes,
        content_type,
    } = out
    else {
        panic!("expected bytes")
    };
    assert_eq!(content_type, "audio/mpeg");
    assert_eq!(bytes, audio);
    assert_eq!(media::probe(&bytes, &content_type).duration_ms, Some(1306));

    let received = server.received_requests().await.unwrap();
    assert_eq!(
        received[0].body_json::<Value>().unwrap(),
        json!({
            "text": "Welcome to the show.",
            "model_id": "eleven_multilingual_v2",
            "voice_settings": {"stability": 0.5, "similarity_boost": 0.75}
        })
    );
    assert_nothing_identifying(&server, None).await;
    // Synchronous: nothing to poll, nothing to cancel.
    assert_eq!(
        permanent_code(&el.poll("x").await.unwrap_err()),
        codes::NOT_FOUND
    );
    el.cancel("x").await.unwrap();
}

#[tokio::test]
async fn elevenlabs_failures() {
    let cases = [
        (
            429,
            json!({"detail": {"type": "rate_limit_error", "code": "concurrent_limit_exceeded", "message": "Too many concurrent requests", "request_id": "r1"}}),
            None,
        ),
        (
            503,
            json!({"detail": {"message": "Service unavailable"}}),
            None,
        ),
        (
            400,
            json!({"detail": {"type": "validation_error", "code": "invalid_parameters", "message": "Unsupported model", "status": "invalid_parameters", "param": "model_id"}}),
            Some(codes::INVALID_PARAMETERS),
        ),
        (
            422,
            json!({"detail": [{"loc": ["body", "text"], "msg": "Field required", "type": "missing"}]}),
            Some(codes::INVALID_PARAMETERS),
        ),
        (
            401,
            json!({"detail": {"status": "quota_exceeded", "message": "You have insufficient quota to complete this request"}}),
            Some(codes::QUOTA_EXCEEDED),
        ),
        (
            401,
            json!({"detail": {"status": "invalid_api_key", "message": "Invalid API key"}}),
            Some(codes::UNAUTHORIZED),
        ),
        (
            400,
            json!({"detail": {"status": "voice_not_found", "message": "Voice not found"}}),
            Some(codes::NOT_FOUND),
        ),
    ];
    for (status, body, expected) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
        let providers = elevenlabs(&server, Duration::from_secs(5));
        let err = providers
            .get("elevenlabs")
            .unwrap()
            .start(&request(Kind::Voiceover, "hello", Value::Null))
            .await
            .unwrap_err();
        match expected {
            None => assert!(
                matches!(err, ProviderError::Transient(_)),
                "{status}: {err:?}"
            ),
            Some(code) => assert_eq!(permanent_code(&err), code, "{status}: {err}"),
        }
    }
}

#[tokio::test]
async fn elevenlabs_timeout_and_validation() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(mp3_bytes(2), "audio/mpeg")
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let providers = elevenlabs(&server, Duration::from_millis(300));
    let el = providers.get("elevenlabs").unwrap();
    let err = el
        .start(&request(Kind::Voiceover, "hello", Value::Null))
        .await
        .unwrap_err();
    assert_eq!(err, ProviderError::Timeout);

    let before = server.received_requests().await.unwrap().len();
    for params in [
        json!({"voice": VOICE}),
        json!({"voice_id": "../v1/user"}),
        json!({"voice_settings": {"stability": 3}}),
        json!({"voice_settings": {"user_id": USER_MARKER}}),
    ] {
        let err = el
            .start(&request(Kind::Voiceover, "hello", params))
            .await
            .unwrap_err();
        assert_eq!(permanent_code(&err), codes::INVALID_PARAMETERS);
    }
    assert_eq!(server.received_requests().await.unwrap().len(), before);
}

// ---------------------------------------------------------------------------
// BytePlus ModelArk Seedance

const TASKS: &str = "/api/v3/contents/generations/tasks";
const TASK_ID: &str = "cgt-20250612172542-k9dq5";

fn seedance(server: &MockServer, timeout: Duration) -> Providers {
    providers(|s| s.seedance = Some(endpoint(server, timeout)))
}

fn task(status: &str) -> Value {
    let mut t = json!({
        "id": TASK_ID,
        "model": "seedance-1-0-pro-250528",
        "status": status,
        "created_at": 1_749_720_342,
        "updated_at": 1_749_720_360
    });
    match status {
        "succeeded" => {
            t["content"] = json!({"video_url": "https://ark-content-generation-ap-southeast-1.tos-ap-southeast-1.volces.com/seedance/cgt.mp4?X-Tos-Signature=abc"});
            t["usage"] = json!({"completion_tokens": 246_840, "total_tokens": 246_840});
            t["seed"] = json!(58_944);
            t["resolution"] = json!("1080p");
            t["ratio"] = json!("16:9");
            t["duration"] = json!(5);
            t["framespersecond"] = json!(24);
        }
        "failed" => {
            t["error"] = json!({"code": "OutputVideoSensitiveContentDetected", "message": "The request failed because the output video may contain sensitive information."});
        }
        _ => {}
    }
    t
}

async fn seedance_task(server: &MockServer, status: &str, times: Option<u64>) {
    let mock = Mock::given(method("GET"))
        .and(path(format!("{TASKS}/{TASK_ID}")))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(task(status)));
    match times {
        Some(n) => mock.up_to_n_times(n).mount(server).await,
        None => mock.mount(server).await,
    }
}

#[tokio::test]
async fn seedance_task_queued_running_succeeded() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TASKS))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": TASK_ID})))
        .expect(1)
        .mount(&server)
        .await;
    seedance_task(&server, "queued", Some(1)).await;
    seedance_task(&server, "running", Some(1)).await;
    seedance_task(&server, "succeeded", None).await;

    let providers = seedance(&server, Duration::from_secs(5));
    let sd = providers.get("seedance").unwrap();
    let req = request(
        Kind::Video,
        "a paper boat drifts down a rainy street",
        json!({"duration": 5, "ratio": "16:9", "resolution": "1080p", "camera_fixed": false}),
    );
    let handle = match sd.start(&req).await.unwrap() {
        Started::Pending { handle } => handle,
        other => panic!("expected Pending, got {other:?}"),
    };
    assert_eq!(handle, TASK_ID);
    assert_eq!(sd.poll(&handle).await.unwrap(), Polled::Running);
    assert_eq!(sd.poll(&handle).await.unwrap(), Polled::Running);
    match sd.poll(&handle).await.unwrap() {
        Polled::Done(Output::MediaUrl { url, content_type }) => {
            assert!(url.contains("/seedance/cgt.mp4"));
            assert_eq!(content_type.as_deref(), Some("video/mp4"));
        }
        other => panic!("expected the video, got {other:?}"),
    }

    let received = server.received_requests().await.unwrap();
    let create = requests_to(&received, TASKS);
    assert_eq!(
        create[0].body_json::<Value>().unwrap(),
        json!({
            "model": "seedance-1-0-pro-250528",
            "content": [{
                "type": "text",
                "text": "a paper boat drifts down a rainy street --ratio 16:9 --duration 5 --resolution 1080p --camerafixed false"
            }]
        })
    );
    assert_nothing_identifying(&server, None).await;
}

/// The resolution is always asked for: the one the video was priced at
/// (`providers::price_tier`), 1080p when none was named, whatever the
/// model's own default.
#[tokio::test]
async fn seedance_asks_for_the_resolution_it_was_priced_at() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TASKS))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": TASK_ID})))
        .mount(&server)
        .await;
    let providers = seedance(&server, Duration::from_secs(5));
    let sd = providers.get("seedance").unwrap();
    for (params, tier) in [
        (Value::Null, "1080p"),
        (json!({"duration": 3}), "1080p"),
        (json!({"resolution": "480P"}), "480p"),
    ] {
        assert_eq!(
            slate_workers::providers::price_tier("seedance", &params).unwrap(),
            Some(tier)
        );
        sd.start(&request(Kind::Video, "a cat", params))
            .await
            .unwrap();
    }
    let received = server.received_requests().await.unwrap();
    let texts: Vec<String> = requests_to(&received, TASKS)
        .iter()
        .map(|r| {
            r.body_json::<Value>().unwrap()["content"][0]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        texts,
        [
            "a cat --ratio 16:9 --duration 5 --resolution 1080p",
            "a cat --ratio 16:9 --duration 3 --resolution 1080p",
            "a cat --ratio 16:9 --duration 5 --resolution 480p",
        ]
    );
    assert_eq!(
        slate_workers::providers::price_tier("fal", &Value::Null).unwrap(),
        None
    );
    assert!(
        slate_workers::providers::price_tier("seedance", &json!({"resolution": "4k"})).is_err()
    );
}

#[tokio::test]
async fn seedance_failures() {
    let cases = [
        (
            429,
            json!({"error": {"code": "RateLimitExceeded.EndpointRPMExceeded", "message": "Too many requests", "param": "", "type": "TooManyRequests"}}),
            None,
        ),
        (
            500,
            json!({"error": {"code": "InternalServiceError", "message": "internal error", "param": "", "type": "InternalServerError"}}),
            None,
        ),
        (
            400,
            json!({"error": {"code": "InputTextSensitiveContentDetected", "message": "The request failed because the input text may contain sensitive information.", "param": "", "type": "BadRequest"}}),
            Some(codes::CONTENT_POLICY),
        ),
        (
            400,
            json!({"error": {"code": "InvalidParameter", "message": "One or more parameters specified in the request are not valid.", "param": "content", "type": "BadRequest"}}),
            Some(codes::INVALID_PARAMETERS),
        ),
        (
            401,
            json!({"error": {"code": "AuthenticationError", "message": "The API key in the request is missing or invalid.", "param": "", "type": "Unauthorized"}}),
            Some(codes::UNAUTHORIZED),
        ),
        (
            404,
            json!({"error": {"code": "InvalidEndpointOrModel.NotFound", "message": "The model or endpoint does not exist.", "param": "", "type": "NotFound"}}),
            Some(codes::NOT_FOUND),
        ),
    ];
    for (status, body, expected) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
        let providers = seedance(&server, Duration::from_secs(5));
        let err = providers
            .get("seedance")
            .unwrap()
            .start(&request(Kind::Video, "a cat", Value::Null))
            .await
            .unwrap_err();
        match expected {
            None => assert!(
                matches!(err, ProviderError::Transient(_)),
                "{status}: {err:?}"
            ),
            Some(code) => assert_eq!(permanent_code(&err), code, "{status}: {err}"),
        }
    }

    // The task itself fails: the output was flagged.
    let server = MockServer::start().await;
    seedance_task(&server, "failed", None).await;
    let providers = seedance(&server, Duration::from_secs(5));
    let err = providers
        .get("seedance")
        .unwrap()
        .poll(TASK_ID)
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::CONTENT_POLICY, "{err}");
}

#[tokio::test]
async fn seedance_refuses_commands_in_the_prompt_and_bad_parameters() {
    let server = MockServer::start().await;
    let providers = seedance(&server, Duration::from_secs(5));
    let sd = providers.get("seedance").unwrap();
    for (prompt, params) in [
        ("a cat --duration 12", Value::Null),
        ("a cat --rs 1080p", Value::Null),
        ("a cat", json!({"duration": 60})),
        ("a cat", json!({"ratio": "2:1"})),
        ("a cat", json!({"resolution": "4k"})),
        ("a cat", json!({"callback_url": "https://example.com/hook"})),
    ] {
        let err = sd
            .start(&request(Kind::Video, prompt, params))
            .await
            .unwrap_err();
        assert_eq!(permanent_code(&err), codes::INVALID_PARAMETERS, "{prompt}");
    }
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn seedance_timeout_and_cancel() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(format!("{TASKS}/{TASK_ID}")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(task("queued"))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    Mock::given(method("DELETE"))
        .and(path(format!("{TASKS}/{TASK_ID}")))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(&server)
        .await;
    let providers = seedance(&server, Duration::from_millis(300));
    let sd = providers.get("seedance").unwrap();
    assert_eq!(sd.poll(TASK_ID).await.unwrap_err(), ProviderError::Timeout);
    // A task whose status cannot be read is not deleted: it may be done.
    assert_eq!(
        sd.cancel(TASK_ID).await.unwrap_err(),
        ProviderError::Timeout
    );
    let deletes = |requests: Vec<wiremock::Request>| {
        requests
            .iter()
            .filter(|r| r.method.as_str() == "DELETE")
            .count()
    };
    assert_eq!(deletes(server.received_requests().await.unwrap()), 0);
    assert_nothing_identifying(&server, None).await;
}

/// Ark's `DELETE` cancels a queued task but deletes a finished one's
/// record, and its video with it: a cancel sends it only for a task it has
/// just read as queued. (Sent blind, a cancel that raced the task's success
/// lost the video the provider billed for, and the user's generation ended
/// canceled.)
#[tokio::test]
async fn seedance_cancel_deletes_only_a_queued_task() {
    for (status, deleted) in [
        ("queued", 1),
        ("running", 0),
        ("succeeded", 0),
        ("failed", 0),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(format!("{TASKS}/{TASK_ID}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(task(status)))
            .mount(&server)
            .await;
        Mock::given(method("DELETE"))
            .and(path(format!("{TASKS}/{TASK_ID}")))
            .and(header("authorization", format!("Bearer {KEY}").as_str()))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
            .expect(deleted)
            .mount(&server)
            .await;
        let providers = seedance(&server, Duration::from_secs(5));
        let sd = providers.get("seedance").unwrap();
        sd.cancel(TASK_ID).await.unwrap();
        server.verify().await;
    }
}

// ---------------------------------------------------------------------------
// Whisper (OpenAI-compatible transcription)

const TRANSCRIPTIONS: &str = "/v1/audio/transcriptions";

/// The presigned URL of the user's upload: its path names the user and the
/// generation, which must not reach the provider.
fn input_url(server: &MockServer) -> String {
    format!(
        "{}/slate-media/users/{USER_MARKER}/collections/c1/{GENERATION_MARKER}.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=5e1f",
        server.uri()
    )
}

async fn serve_input(server: &MockServer, template: ResponseTemplate) {
    Mock::given(method("GET"))
        .and(path(format!(
            "/slate-media/users/{USER_MARKER}/collections/c1/{GENERATION_MARKER}.wav"
        )))
        .respond_with(template)
        .mount(server)
        .await;
}

fn transcription(server: &MockServer, params: Value) -> ProviderRequest {
    ProviderRequest {
        kind: Kind::Transcription,
        prompt: None,
        input_url: Some(input_url(server)),
        parameters: params,
    }
}

fn whisper(server: &MockServer, timeout: Duration, key: bool) -> Providers {
    providers(|s| {
        let mut e = endpoint(server, timeout);
        if !key {
            e.api_key = None;
        }
        s.whisper = Some(e);
    })
}

#[tokio::test]
async fn whisper_downloads_then_uploads_multipart() {
    let server = MockServer::start().await;
    let wav = local::speech_wav("hello world");
    serve_input(
        &server,
        ResponseTemplate::new(200).set_body_raw(wav.clone(), "application/octet-stream"),
    )
    .await;
    Mock::given(method("POST"))
        .and(path(TRANSCRIPTIONS))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"text": " Hello world. "}))
                .insert_header("x-request-id", "req_abc123"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let providers = whisper(&server, Duration::from_secs(5), true);
    let w = providers.get("whisper").unwrap();
    assert!(w.supports(Kind::Transcription) && !w.supports(Kind::Script));
    let out = w
        .start(&transcription(&server, json!({"language": "en"})))
        .await
        .unwrap();
    assert_eq!(
        out,
        Started::Done(Output::Text {
            text: "Hello world.".into()
        })
    );

    let received = server.received_requests().await.unwrap();
    let download = received
        .iter()
        .find(|r| r.method.as_str() == "GET")
        .unwrap();
    assert!(
        download.headers.get("authorization").is_none(),
        "our key never goes to the input URL"
    );
    let upload = requests_to(&received, TRANSCRIPTIONS)[0];
    let content_type = upload.headers["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("multipart/form-data; boundary="));
    let body = String::from_utf8_lossy(&upload.body);
    for expected in [
        "name=\"model\"\r\n\r\nwhisper-1\r\n",
        "name=\"response_format\"\r\n\r\njson\r\n",
        "name=\"language\"\r\n\r\nen\r\n",
        "name=\"file\"; filename=\"audio.wav\"",
        "Content-Type: audio/wav",
    ] {
        assert!(body.contains(expected), "multipart lacks {expected:?}");
    }
    assert!(upload.body.windows(wav.len()).any(|w| w == wav.as_slice()));
    // The S3 request names the user (that is our own storage); the provider
    // request must not.
    assert_nothing_identifying(&server, Some("/slate-media/")).await;
}

#[tokio::test]
async fn whisper_without_key_sends_no_authorization() {
    let server = MockServer::start().await;
    serve_input(
        &server,
        ResponseTemplate::new(200).set_body_raw(local::speech_wav("hi there"), "audio/wav"),
    )
    .await;
    Mock::given(method("POST"))
        .and(path(TRANSCRIPTIONS))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"text": "hi there"})))
        .mount(&server)
        .await;
    let providers = whisper(&server, Duration::from_secs(5), false);
    providers
        .get("whisper")
        .unwrap()
        .start(&transcription(&server, Value::Null))
        .await
        .unwrap();
    let received = server.received_requests().await.unwrap();
    assert!(
        received
            .iter()
            .all(|r| r.headers.get("authorization").is_none())
    );
}

#[tokio::test]
async fn whisper_failures() {
    let wav = local::speech_wav("hello");
    let cases = [
        (
            503,
            json!({"error": {"message": "The server is overloaded", "type": "server_error", "param": null, "code": null}}),
            None,
        ),
        (
            429,
            json!({"error": {"message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}),
            None,
        ),
        (
            400,
            json!({"error": {"message": "Invalid file format.", "type": "invalid_request_error", "param": null, "code": null}}),
            Some(codes::INVALID_PARAMETERS),
        ),
        (
            401,
            json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}),
            Some(codes::UNAUTHORIZED),
        ),
        (
            429,
            json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}),
            Some(codes::QUOTA_EXCEEDED),
        ),
    ];
    for (status, body, expected) in cases {
        let server = MockServer::start().await;
        serve_input(
            &server,
            ResponseTemplate::new(200).set_body_raw(wav.clone(), "audio/wav"),
        )
        .await;
        Mock::given(method("POST"))
            .and(path(TRANSCRIPTIONS))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
        let providers = whisper(&server, Duration::from_secs(5), true);
        let err = providers
            .get("whisper")
            .unwrap()
            .start(&transcription(&server, Value::Null))
            .await
            .unwrap_err();
        match expected {
            None => assert!(
                matches!(err, ProviderError::Transient(_)),
                "{status}: {err:?}"
            ),
            Some(code) => assert_eq!(permanent_code(&err), code, "{status}: {err}"),
        }
    }
}

#[tokio::test]
async fn whisper_input_problems() {
    // Expired presigned URL: permanent, and nothing is uploaded.
    let server = MockServer::start().await;
    serve_input(
        &server,
        ResponseTemplate::new(403).set_body_string("<Error><Code>AccessDenied</Code></Error>"),
    )
    .await;
    let providers = whisper(&server, Duration::from_secs(5), true);
    let w = providers.get("whisper").unwrap();
    let err = w
        .start(&transcription(&server, Value::Null))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::INPUT_UNAVAILABLE);
    // The message names no URL (it carries a signature and the user's path).
    assert!(!err.to_string().contains(USER_MARKER) && !err.to_string().contains("Signature"));

    // Storage hiccup: transient.
    let server = MockServer::start().await;
    serve_input(&server, ResponseTemplate::new(503)).await;
    let providers = whisper(&server, Duration::from_secs(5), true);
    let err = providers
        .get("whisper")
        .unwrap()
        .start(&transcription(&server, Value::Null))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");

    // More than OpenAI's 25 MB: refused before any upload.
    let server = MockServer::start().await;
    let mut big = local::speech_wav("x");
    big.resize(25 * 1024 * 1024 + 1, 0);
    serve_input(
        &server,
        ResponseTemplate::new(200).set_body_raw(big, "audio/wav"),
    )
    .await;
    let providers = whisper(&server, Duration::from_secs(5), true);
    let err = providers
        .get("whisper")
        .unwrap()
        .start(&transcription(&server, Value::Null))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::INPUT_TOO_LARGE);
    let received = server.received_requests().await.unwrap();
    assert!(requests_to(&received, TRANSCRIPTIONS).is_empty());

    // No input at all.
    let err = providers
        .get("whisper")
        .unwrap()
        .start(&request(Kind::Transcription, "", Value::Null))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::INVALID_PARAMETERS);
}

#[tokio::test]
async fn whisper_timeout() {
    let server = MockServer::start().await;
    serve_input(
        &server,
        ResponseTemplate::new(200).set_body_raw(local::speech_wav("slow"), "audio/wav"),
    )
    .await;
    Mock::given(method("POST"))
        .and(path(TRANSCRIPTIONS))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"text": "late"}))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let providers = whisper(&server, Duration::from_millis(300), true);
    let err = providers
        .get("whisper")
        .unwrap()
        .start(&transcription(&server, Value::Null))
        .await
        .unwrap_err();
    assert_eq!(err, ProviderError::Timeout);
}

// ---------------------------------------------------------------------------
// Ark chat (scripts)

const CHAT: &str = "/api/v3/chat/completions";

fn ark(server: &MockServer, timeout: Duration) -> Providers {
    providers(|s| s.ark = Some(endpoint(server, timeout)))
}

fn completion(content: &str, finish_reason: &str) -> Value {
    json!({
        "choices": [{
            "finish_reason": finish_reason,
            "index": 0,
            "logprobs": null,
            "message": {"content": content, "role": "assistant"}
        }],
        "created": 1_742_631_811,
        "id": "0217426318107460cfa43dc3f3683b1de1c09624ff49085a456ac",
        "model": "seed-1-6-250915",
        "service_tier": "default",
        "object": "chat.completion",
        "usage": {"completion_tokens": 60, "prompt_tokens": 19, "total_tokens": 79}
    })
}

#[tokio::test]
async fn ark_chat_writes_a_script() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(CHAT))
        .and(header("authorization", format!("Bearer {KEY}").as_str()))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(completion("TITLE: Rain\n\nSCENE 1. A street.", "stop")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let providers = ark(&server, Duration::from_secs(5));
    let chat = providers.get("ark").unwrap();
    assert!(chat.supports(Kind::Script) && !chat.supports(Kind::Video));
    let out = chat
        .start(&request(
            Kind::Script,
            "a 30-second ad for an umbrella",
            json!({"max_tokens": 800}),
        ))
        .await
        .unwrap();
    assert_eq!(
        out,
        Started::Done(Output::Text {
            text: "TITLE: Rain\n\nSCENE 1. A street.".into()
        })
    );
    let received = server.received_requests().await.unwrap();
    let body: Value = received[0].body_json().unwrap();
    assert_eq!(body["model"], "seed-1-6-250915");
    assert_eq!(body["max_tokens"], 800);
    assert_eq!(body["messages"][0]["role"], "system");
    assert_eq!(
        body["messages"][1],
        json!({"role": "user", "content": "a 30-second ad for an umbrella"})
    );
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 3, "model, messages, max_tokens only: {keys:?}");
    assert_nothing_identifying(&server, None).await;
}

#[tokio::test]
async fn ark_chat_failures() {
    let cases = [
        (
            503,
            json!({"error": {"code": "ServerOverloaded", "message": "The service is overloaded", "param": "", "type": "ServiceUnavailable"}}),
            None,
        ),
        (
            429,
            json!({"error": {"code": "RateLimitExceeded.EndpointTPMExceeded", "message": "TPM exceeded", "param": "", "type": "TooManyRequests"}}),
            None,
        ),
        (
            400,
            json!({"error": {"code": "SensitiveContentDetected", "message": "The request failed because the input text may contain sensitive information.", "param": "", "type": "BadRequest"}}),
            Some(codes::CONTENT_POLICY),
        ),
        (
            400,
            json!({"error": {"code": "InvalidParameter", "message": "One or more parameters specified in the request are not valid.", "param": "max_tokens", "type": "BadRequest"}}),
            Some(codes::INVALID_PARAMETERS),
        ),
        (
            403,
            json!({"error": {"code": "AccountOverdueError", "message": "Your account has an overdue balance.", "param": "", "type": "Forbidden"}}),
            Some(codes::QUOTA_EXCEEDED),
        ),
    ];
    for (status, body, expected) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_json(body))
            .mount(&server)
            .await;
        let providers = ark(&server, Duration::from_secs(5));
        let err = providers
            .get("ark")
            .unwrap()
            .start(&request(Kind::Script, "an ad", Value::Null))
            .await
            .unwrap_err();
        match expected {
            None => assert!(
                matches!(err, ProviderError::Transient(_)),
                "{status}: {err:?}"
            ),
            Some(code) => assert_eq!(permanent_code(&err), code, "{status}: {err}"),
        }
    }

    // A 200 whose answer the content filter withheld.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("", "content_filter")))
        .mount(&server)
        .await;
    let err = ark(&server, Duration::from_secs(5))
        .get("ark")
        .unwrap()
        .start(&request(Kind::Script, "an ad", Value::Null))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::CONTENT_POLICY);

    // A 200 that is not the expected shape.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>gateway</html>"))
        .mount(&server)
        .await;
    let err = ark(&server, Duration::from_secs(5))
        .get("ark")
        .unwrap()
        .start(&request(Kind::Script, "an ad", Value::Null))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::PROVIDER_ERROR);
}

#[tokio::test]
async fn ark_chat_timeout() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(completion("late", "stop"))
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    let err = ark(&server, Duration::from_millis(300))
        .get("ark")
        .unwrap()
        .start(&request(Kind::Script, "an ad", Value::Null))
        .await
        .unwrap_err();
    assert_eq!(err, ProviderError::Timeout);
}

#[tokio::test]
async fn unreachable_provider_is_transient() {
    // A port nothing listens on (wiremock keeps dropped servers in a pool,
    // still listening, so take a port from the OS and let it go).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let providers = providers(|s| {
        s.ark = Some(EndpointSettings::new(
            uri,
            Some(ApiKey::new(KEY)),
            Duration::from_secs(2),
        ))
    });
    let err = providers
        .get("ark")
        .unwrap()
        .start(&request(Kind::Script, "an ad", Value::Null))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Transient(_)), "{err:?}");
}

// ---------------------------------------------------------------------------
// Settings and the registry

#[tokio::test]
async fn registry_and_settings() {
    let only_local = Providers::new(&ProviderSettings::default()).unwrap();
    assert_eq!(only_local.names().collect::<Vec<_>>(), ["local"]);
    assert!(only_local.get("fal").is_none());

    let server = MockServer::start().await;
    let e = endpoint(&server, Duration::from_secs(1));
    let all = Providers::new(&ProviderSettings {
        fal: Some(e.clone()),
        elevenlabs: Some(e.clone()),
        seedance: Some(e.clone()),
        whisper: Some(e.clone()),
        ark: Some(e),
        local: true,
    })
    .unwrap();
    assert_eq!(
        all.names().collect::<Vec<_>>(),
        ["fal", "elevenlabs", "seedance", "whisper", "ark", "local"]
    );
    for p in ["fal", "elevenlabs", "seedance", "whisper", "ark", "local"] {
        assert_eq!(all.get(p).unwrap().name(), p);
    }
    // The key never shows in Debug output.
    assert!(!format!("{all:?}").contains(KEY));

    // A provider that needs a key refuses to start without one.
    let keyless = EndpointSettings::new(server.uri(), None, Duration::from_secs(1));
    assert!(
        Providers::new(&ProviderSettings {
            fal: Some(keyless),
            ..ProviderSettings::default()
        })
        .is_err()
    );
    let bad_url =
        EndpointSettings::new("not a url", Some(ApiKey::new(KEY)), Duration::from_secs(1));
    assert!(
        Providers::new(&ProviderSettings {
            seedance: Some(bad_url),
            ..ProviderSettings::default()
        })
        .is_err()
    );
}

// ---------------------------------------------------------------------------
// The local provider

fn local_provider() -> Providers {
    Providers::new(&ProviderSettings::default()).unwrap()
}

async fn local_done(p: &Provider, req: &ProviderRequest) -> Output {
    match p.start(req).await.unwrap() {
        Started::Done(out) => out,
        other => panic!("expected Done, got {other:?}"),
    }
}

#[tokio::test]
async fn local_voiceover_is_a_wav_of_the_expected_length() {
    let providers = local_provider();
    let p = providers.get("local").unwrap();
    let out = local_done(p, &request(Kind::Voiceover, "hello world", Value::Null)).await;
    let Output::MediaBytes {
        bytes,
        content_type,
    } = out
    else {
        panic!("expected bytes")
    };
    assert_eq!(content_type, "audio/wav");
    assert!(bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WAVE");
    // Two five-letter words: 2 × (250 ms tone + 50 ms pause).
    assert_eq!(media::probe(&bytes, &content_type).duration_ms, Some(600));
    assert_eq!(local::speech_duration_ms("hello world"), 600);
    assert_eq!(bytes.len(), 44 + 600 * 16 * 2);

    let longer = local::speech_wav("hello world, this is a somewhat longer voiceover");
    let d = media::probe(&longer, "audio/wav").duration_ms.unwrap();
    assert!(d > 600);
    assert_eq!(
        d,
        local::speech_duration_ms("hello world, this is a somewhat longer voiceover")
    );
    // Deterministic.
    assert_eq!(local::speech_wav("hello world"), bytes);
}

#[tokio::test]
async fn local_video_is_an_animated_gif() {
    let providers = local_provider();
    let p = providers.get("local").unwrap();
    let out = local_done(p, &request(Kind::Video, "a red kite", Value::Null)).await;
    let Output::MediaBytes {
        bytes,
        content_type,
    } = out
    else {
        panic!("expected bytes")
    };
    assert_eq!(content_type, "image/gif");
    assert_eq!(
        media::probe(&bytes, &content_type),
        media::MediaInfo {
            width: Some(64),
            height: Some(36),
            duration_ms: Some(2_000)
        }
    );
    // A real decoder agrees: 8 frames of 64×36 at 25 cs.
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    let mut decoder = options.read_info(bytes.as_slice()).unwrap();
    let mut frames = 0;
    while let Some(frame) = decoder.read_next_frame().unwrap() {
        assert_eq!((frame.width, frame.height, frame.delay), (64, 36, 25));
        frames += 1;
    }
    assert_eq!(frames, 8);

    let out = local_done(
        p,
        &request(Kind::Video, "a red kite", json!({"duration": 3})),
    )
    .await;
    let Output::MediaBytes { bytes, .. } = out else {
        panic!("expected bytes")
    };
    assert_eq!(media::probe(&bytes, "image/gif").duration_ms, Some(3_000));
}

#[tokio::test]
async fn local_text_outputs() {
    let providers = local_provider();
    let p = providers.get("local").unwrap();
    let a = local_done(
        p,
        &request(Kind::Script, "a lighthouse at night", Value::Null),
    )
    .await;
    let b = local_done(
        p,
        &request(Kind::Script, "a lighthouse at night", Value::Null),
    )
    .await;
    assert_eq!(a, b, "deterministic");
    let Output::Text { text } = a else {
        panic!("expected text")
    };
    assert!(text.starts_with("TITLE: A Lighthouse At Night"));

    let out = local_done(
        p,
        &ProviderRequest {
            kind: Kind::Transcription,
            prompt: None,
            input_url: Some("http://127.0.0.1:1/not-fetched.wav".into()),
            parameters: Value::Null,
        },
    )
    .await;
    assert_eq!(
        out,
        Output::Text {
            text: local::TRANSCRIPT.into()
        }
    );
}

#[tokio::test]
async fn local_fails_and_waits_on_demand() {
    let providers = local_provider();
    let p = providers.get("local").unwrap();
    let err = p
        .start(&request(Kind::Video, "x", json!({"fail": "transient"})))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Transient(_)));
    let err = p
        .start(&request(Kind::Voiceover, "x", json!({"fail": "permanent"})))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::CONTENT_POLICY);
    let err = p
        .start(&request(Kind::Script, "x", json!({"fail": "timeout"})))
        .await
        .unwrap_err();
    assert_eq!(err, ProviderError::Timeout);

    let err = p
        .start(&request(Kind::Script, "x", json!({"fail": true})))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::INVALID_PARAMETERS);

    let started = Instant::now();
    local_done(p, &request(Kind::Script, "x", json!({"delay_ms": 150}))).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    let err = p
        .start(&request(Kind::Script, "x", json!({"delay_ms": 60_001})))
        .await
        .unwrap_err();
    assert_eq!(permanent_code(&err), codes::INVALID_PARAMETERS);
}

#[tokio::test]
async fn local_pending_then_running_then_done() {
    let providers = local_provider();
    let p = providers.get("local").unwrap();
    let req = request(Kind::Script, "a quiet harbour", json!({"pending_polls": 2}));
    let handle = match p.start(&req).await.unwrap() {
        Started::Pending { handle } => handle,
        other => panic!("expected Pending, got {other:?}"),
    };
    assert_eq!(p.poll(&handle).await.unwrap(), Polled::Running);
    assert_eq!(p.poll(&handle).await.unwrap(), Polled::Running);
    assert!(matches!(
        p.poll(&handle).await.unwrap(),
        Polled::Done(Output::Text { .. })
    ));
    // Gone once collected; unknown handles are not found.
    assert_eq!(
        permanent_code(&p.poll(&handle).await.unwrap_err()),
        codes::NOT_FOUND
    );
    // Cancel forgets a pending job.
    let Started::Pending { handle } = p.start(&req).await.unwrap() else {
        panic!("expected Pending")
    };
    p.cancel(&handle).await.unwrap();
    assert_eq!(
        permanent_code(&p.poll(&handle).await.unwrap_err()),
        codes::NOT_FOUND
    );
}
