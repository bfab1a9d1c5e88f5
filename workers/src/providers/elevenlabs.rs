//! ElevenLabs text-to-speech, synchronous:
//! `POST {base}/v1/text-to-speech/{voice_id}?output_format=…` with header
//! `xi-api-key` and `{"text", "model_id", "voice_settings"?, …}` → the audio
//! bytes (`audio/mpeg` for the mp3 formats).
//!
//! Errors carry `{"detail": {"type", "code", "message", "status"(legacy)}}`,
//! or FastAPI's `{"detail": [{"loc", "msg", "type"}]}` for 422.

use std::time::Duration;

use serde_json::{Map, Value};

use super::{
    ApiKey, EndpointSettings, ErrorDetail, Http, KeyStyle, Output, ProviderError, ProviderRequest,
    SettingsError, parameters, read_capped, refine_code, required_prompt, str_field, truncate,
};

pub const NAME: &str = "elevenlabs";
pub const BASE_URL: &str = "https://api.elevenlabs.io";
/// "George", a premade voice every account has.
pub const DEFAULT_VOICE_ID: &str = "JBFqnCBsd6RMkjVDRZzb";
pub const DEFAULT_MODEL_ID: &str = "eleven_multilingual_v2";
pub const DEFAULT_OUTPUT_FORMAT: &str = "mp3_44100_128";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest audio answer we accept.
pub const MAX_AUDIO_BYTES: usize = 64 << 20;

const ALLOWED: &[&str] = &[
    "voice_id",
    "model_id",
    "model",
    "output_format",
    "voice_settings",
    "language_code",
    "language",
    "seed",
];

#[derive(Debug, Clone)]
pub struct ElevenLabsClient {
    http: Http,
    /// The models offered (see `super::offered_model`).
    models: Vec<String>,
}

impl ElevenLabsClient {
    /// Settings with the real base URL and the default timeout.
    pub fn settings(api_key: ApiKey) -> EndpointSettings {
        EndpointSettings::new(BASE_URL, Some(api_key), DEFAULT_TIMEOUT)
    }

    pub fn new(
        client: reqwest::Client,
        settings: &EndpointSettings,
    ) -> Result<Self, SettingsError> {
        Ok(Self {
            http: Http::new(
                NAME,
                client,
                settings,
                KeyStyle {
                    header: "xi-api-key",
                    prefix: "",
                    required: true,
                },
            )?,
            models: settings.models.clone(),
        })
    }

    /// The model `parameters` ask for, if it is offered (see
    /// `super::offered_model`).
    pub(crate) fn model(&self, parameters: &Value) -> Result<String, ProviderError> {
        super::offered_model(
            parameters,
            &["model_id", "model"],
            &self.models,
            DEFAULT_MODEL_ID,
        )
    }

    /// Parameters: `voice_id`, `model_id` (or `model`), `output_format`,
    /// `voice_settings` (object: stability, similarity_boost, style, speed,
    /// use_speaker_boost), `language_code` (or `language`), `seed`.
    pub async fn start(&self, req: &ProviderRequest) -> Result<Output, ProviderError> {
        let text = required_prompt(req, "text to speak")?;
        let p = parameters(req, ALLOWED)?;
        let voice_id = p.token("voice_id", "", 64)?.unwrap_or(DEFAULT_VOICE_ID);
        let model_id = self.model(&req.parameters)?;
        let output_format = p
            .token("output_format", "_", 32)?
            .unwrap_or(DEFAULT_OUTPUT_FORMAT);

        let mut body = Map::new();
        body.insert("text".into(), Value::String(text.to_owned()));
        body.insert("model_id".into(), Value::String(model_id));
        if let Some(settings) = p.get("voice_settings") {
            body.insert("voice_settings".into(), voice_settings(settings)?);
        }
        let language = match p.token("language_code", "-", 8)? {
            Some(l) => Some(l),
            None => p.token("language", "-", 8)?,
        };
        if let Some(language) = language {
            body.insert("language_code".into(), Value::String(language.to_owned()));
        }
        if let Some(seed) = p.integer("seed", 0..=4_294_967_295)? {
            body.insert("seed".into(), Value::from(seed));
        }

        let mut url = self.http.url(&format!("v1/text-to-speech/{voice_id}"));
        url.query_pairs_mut()
            .append_pair("output_format", output_format);
        let request = self
            .http
            .client
            .post(url)
            .headers(self.http.auth())
            .json(&body);
        let response = self.http.send("text_to_speech", request).await?;
        if !response.status().is_success() {
            return Err(self
                .http
                .failure("text_to_speech", response, read_error)
                .await);
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| content_type_for(output_format).to_owned());
        let bytes = read_capped(response, MAX_AUDIO_BYTES).await?;
        if bytes.is_empty() {
            return Err(ProviderError::Transient(
                "elevenlabs: empty audio answer".into(),
            ));
        }
        Ok(Output::MediaBytes {
            bytes,
            content_type,
        })
    }
}

/// Only the documented voice settings, each a number in 0..=1 (speed
/// 0.7..=1.2) or a bool.
fn voice_settings(v: &Value) -> Result<Value, ProviderError> {
    let Value::Object(m) = v else {
        return Err(ProviderError::invalid("voice_settings must be an object"));
    };
    let mut out = Map::new();
    for (k, v) in m {
        let ok = match k.as_str() {
            "stability" | "similarity_boost" | "style" => {
                v.as_f64().is_some_and(|n| (0.0..=1.0).contains(&n))
            }
            "speed" => v.as_f64().is_some_and(|n| (0.7..=1.2).contains(&n)),
            "use_speaker_boost" => v.is_boolean(),
            _ => false,
        };
        if !ok {
            return Err(ProviderError::invalid(format!(
                "voice_settings.{} is not a known setting or out of range",
                truncate(k, 40)
            )));
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(Value::Object(out))
}

/// For when the answer has no content type: ElevenLabs formats are
/// `codec_samplerate[_bitrate]`.
fn content_type_for(output_format: &str) -> &'static str {
    match output_format.split('_').next() {
        Some("mp3") => "audio/mpeg",
        Some("wav") => "audio/wav",
        Some("opus") => "audio/opus",
        Some("ulaw") => "audio/basic",
        _ => "application/octet-stream",
    }
}

fn read_error(body: &Value) -> ErrorDetail {
    let mut detail = ErrorDetail::default();
    match body.get("detail") {
        Some(obj @ Value::Object(_)) => {
            detail.code = str_field(obj, "code")
                .or_else(|| str_field(obj, "status"))
                .or_else(|| str_field(obj, "type"))
                .map(|c| truncate(c, 60));
            detail.message = str_field(obj, "message").map(|m| truncate(m, 200));
        }
        Some(Value::Array(items)) => {
            detail.code = items
                .first()
                .and_then(|i| str_field(i, "type"))
                .map(|c| truncate(c, 60));
            detail.message = items
                .first()
                .and_then(|i| str_field(i, "msg"))
                .map(|m| truncate(m, 200));
        }
        Some(Value::String(s)) => detail.message = Some(truncate(s, 200)),
        _ => {}
    }
    detail.refined = detail.code.as_deref().and_then(refine_code);
    detail
}
