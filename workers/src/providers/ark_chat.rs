//! BytePlus ModelArk chat (Doubao / Seed models) for scripts, OpenAI-style:
//! `POST {base}/api/v3/chat/completions` with a Bearer key and
//! `{"model", "messages": [{"role": "system", …}, {"role": "user", "content": prompt}]}`
//! → `choices[0].message.content`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::seedance::read_error;
use super::{
    ApiKey, EndpointSettings, Http, KeyStyle, Output, ProviderError, ProviderRequest,
    SettingsError, codes, parameters, required_prompt,
};

pub const NAME: &str = "ark";
pub const BASE_URL: &str = "https://ark.ap-southeast.bytepluses.com";
pub const DEFAULT_MODEL: &str = "seed-1-6-250915";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a scriptwriter for short videos. Write a clear, \
    vivid script for the idea you are given: a title line, then numbered scenes, each with what \
    the viewer sees and the narration. Answer with the script only.";

const ALLOWED: &[&str] = &["model", "system", "max_tokens", "temperature", "top_p"];

#[derive(Debug, Clone)]
pub struct ArkChatClient {
    http: Http,
    /// The models offered (see `super::offered_model`).
    models: Vec<String>,
}

#[derive(Deserialize)]
struct Completion {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

impl ArkChatClient {
    /// Settings with the real base URL and the default timeout.
    pub fn settings(api_key: ApiKey) -> EndpointSettings {
        EndpointSettings::new(BASE_URL, Some(api_key), DEFAULT_TIMEOUT)
    }

    pub fn new(
        client: reqwest::Client,
        settings: &EndpointSettings,
    ) -> Result<Self, SettingsError> {
        Ok(Self {
            http: Http::new(NAME, client, settings, KeyStyle::BEARER)?,
            models: settings.models.clone(),
        })
    }

    /// The model `parameters` ask for, if it is offered (see
    /// `super::offered_model`).
    pub(crate) fn model(&self, parameters: &Value) -> Result<String, ProviderError> {
        super::offered_model(parameters, &["model"], &self.models, DEFAULT_MODEL)
    }

    /// Parameters: `model`, `system` (replaces the default system prompt),
    /// `max_tokens` (1–32768), `temperature` (0–2), `top_p` (0–1).
    pub async fn start(&self, req: &ProviderRequest) -> Result<Output, ProviderError> {
        let prompt = required_prompt(req, "prompt")?;
        let p = parameters(req, ALLOWED)?;
        let model = self.model(&req.parameters)?;
        let system = p.string("system")?.unwrap_or(DEFAULT_SYSTEM_PROMPT);
        let mut body = Map::new();
        body.insert("model".into(), json!(model));
        body.insert(
            "messages".into(),
            json!([
                {"role": "system", "content": system},
                {"role": "user", "content": prompt},
            ]),
        );
        if let Some(n) = p.integer("max_tokens", 1..=32_768)? {
            body.insert("max_tokens".into(), json!(n));
        }
        if let Some(t) = p.number("temperature", 0.0..=2.0)? {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(t) = p.number("top_p", 0.0..=1.0)? {
            body.insert("top_p".into(), json!(t));
        }

        let request = self
            .http
            .client
            .post(self.http.url("api/v3/chat/completions"))
            .headers(self.http.auth())
            .json(&Value::Object(body));
        let response = self.http.send("chat", request).await?;
        if !response.status().is_success() {
            return Err(self.http.failure("chat", response, read_error).await);
        }
        let completion: Completion = self.http.json(response).await?;
        let choice = completion.choices.into_iter().next().ok_or_else(|| {
            ProviderError::permanent(codes::PROVIDER_ERROR, "ark: answer has no choices")
        })?;
        if choice.finish_reason.as_deref() == Some("content_filter") {
            return Err(ProviderError::permanent(
                codes::CONTENT_POLICY,
                "ark: the answer was withheld by the content filter",
            ));
        }
        let text = choice.message.content.unwrap_or_default().trim().to_owned();
        if text.is_empty() {
            return Err(ProviderError::permanent(
                codes::PROVIDER_ERROR,
                "ark: empty answer",
            ));
        }
        Ok(Output::Text { text })
    }
}
