//! OpenAI-compatible transcription (OpenAI, or a whisper.cpp server started
//! with `--inference-path /v1/audio/transcriptions`):
//! `POST {base}/v1/audio/transcriptions`, multipart `file`, `model`,
//! `language`?, `prompt`?, `response_format=json`, Bearer key (optional) →
//! `{"text": "…"}`.
//!
//! The adapter first downloads the audio from the request's `input_url`
//! (a presigned URL; fetched without our key, capped at 25 MB, OpenAI's
//! limit) and uploads it under a fixed file name: neither the URL nor its
//! path (which names our user) reaches the provider.

use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde::Deserialize;
use serde_json::Value;

use super::{
    ApiKey, EndpointSettings, ErrorDetail, Http, KeyStyle, Output, ProviderError, ProviderRequest,
    SettingsError, codes, parameters, read_capped, refine_code, str_field, truncate,
};
use crate::media;

pub const NAME: &str = "whisper";
pub const BASE_URL: &str = "https://api.openai.com";
pub const DEFAULT_MODEL: &str = "whisper-1";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// OpenAI's upload limit.
pub const MAX_INPUT_BYTES: usize = 25 * 1024 * 1024;

const ALLOWED: &[&str] = &["model", "language", "temperature"];

#[derive(Debug, Clone)]
pub struct WhisperClient {
    http: Http,
    /// The models offered (see `super::offered_model`).
    models: Vec<String>,
}

#[derive(Deserialize)]
struct Transcription {
    text: String,
}

impl WhisperClient {
    /// Settings with OpenAI's base URL and the default timeout.
    pub fn settings(api_key: ApiKey) -> EndpointSettings {
        EndpointSettings::new(BASE_URL, Some(api_key), DEFAULT_TIMEOUT)
    }

    /// The key is optional (a whisper.cpp server needs none).
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
                    required: false,
                    ..KeyStyle::BEARER
                },
            )?,
            models: settings.models.clone(),
        })
    }

    /// The model `parameters` ask for, if it is offered (see
    /// `super::offered_model`).
    pub(crate) fn model(&self, parameters: &Value) -> Result<String, ProviderError> {
        super::offered_model(parameters, &["model"], &self.models, DEFAULT_MODEL)
    }

    /// Parameters: `model` (default whisper-1), `language` (ISO-639-1),
    /// `temperature` (0–1). The request's prompt, when set, is passed as
    /// Whisper's `prompt` (vocabulary and style hint).
    pub async fn start(&self, req: &ProviderRequest) -> Result<Output, ProviderError> {
        let input_url = req
            .input_url
            .as_deref()
            .ok_or_else(|| ProviderError::invalid("input_url is required"))?;
        let input_url = reqwest::Url::parse(input_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| ProviderError::invalid("input_url must be an http(s) URL"))?;
        let p = parameters(req, ALLOWED)?;
        let model = self.model(&req.parameters)?;
        let language = p.token("language", "-", 8)?;
        let temperature = p.number("temperature", 0.0..=1.0)?;

        let (audio, content_type) = self.download(input_url).await?;
        let content_type = media::sniff_content_type(&audio)
            .or(content_type.as_deref().filter(|c| is_audio_or_video(c)))
            .map(str::to_owned)
            .ok_or_else(|| ProviderError::invalid("input is not an audio or video file"))?;
        // Whisper tells formats apart by the file name's extension.
        let file_name = format!("audio.{}", media::extension_for(&content_type));
        let part = Part::bytes(audio)
            .file_name(file_name)
            .mime_str(&content_type)
            .map_err(|_| ProviderError::invalid("input content type is not valid"))?;
        let mut form = Form::new()
            .part("file", part)
            .text("model", model)
            .text("response_format", "json");
        if let Some(language) = language {
            form = form.text("language", language.to_owned());
        }
        if let Some(prompt) = req.prompt.as_deref().filter(|p| !p.trim().is_empty()) {
            form = form.text("prompt", prompt.to_owned());
        }
        if let Some(t) = temperature {
            form = form.text("temperature", t.to_string());
        }

        let request = self
            .http
            .client
            .post(self.http.url("v1/audio/transcriptions"))
            .headers(self.http.auth())
            .multipart(form);
        let response = self.http.send("transcribe", request).await?;
        if !response.status().is_success() {
            return Err(self.http.failure("transcribe", response, read_error).await);
        }
        let transcription: Transcription = self.http.json(response).await?;
        Ok(Output::Text {
            text: transcription.text.trim().to_owned(),
        })
    }

    /// GET the input (no key, same timeout), at most 25 MB. A client error
    /// (expired or missing object) is permanent; 5xx and 429 transient.
    async fn download(
        &self,
        url: reqwest::Url,
    ) -> Result<(Vec<u8>, Option<String>), ProviderError> {
        let response = self
            .http
            .send("download_input", self.http.client.get(url))
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(match super::classify(status) {
                ProviderError::Permanent { .. } => ProviderError::permanent(
                    codes::INPUT_UNAVAILABLE,
                    format!("input URL answered HTTP {}", status.as_u16()),
                ),
                other => other,
            });
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.to_owned());
        let audio = read_capped(response, MAX_INPUT_BYTES)
            .await
            .map_err(|e| match e {
                ProviderError::Permanent { code, .. } if code == codes::INPUT_TOO_LARGE => {
                    ProviderError::permanent(
                        codes::INPUT_TOO_LARGE,
                        format!("input is larger than {} MB", MAX_INPUT_BYTES >> 20),
                    )
                }
                other => other,
            })?;
        if audio.is_empty() {
            return Err(ProviderError::invalid("input is empty"));
        }
        Ok((audio, content_type))
    }
}

fn is_audio_or_video(content_type: &str) -> bool {
    let c = content_type.trim().to_ascii_lowercase();
    c.starts_with("audio/") || c.starts_with("video/")
}

/// OpenAI errors: `{"error": {"message", "type", "param", "code"}}`;
/// whisper.cpp answers `{"error": "…"}`.
fn read_error(body: &Value) -> ErrorDetail {
    let error = body.get("error").unwrap_or(&Value::Null);
    if let Some(s) = error.as_str() {
        return ErrorDetail {
            message: Some(truncate(s, 200)),
            ..ErrorDetail::default()
        };
    }
    let code = str_field(error, "code")
        .or_else(|| str_field(error, "type"))
        .map(|c| truncate(c, 60));
    ErrorDetail {
        refined: code.as_deref().and_then(refine_code),
        code,
        message: str_field(error, "message").map(|m| truncate(m, 200)),
    }
}
