//! BytePlus ModelArk Seedance (video), a task API:
//! `POST {base}/api/v3/contents/generations/tasks` with a Bearer key and
//! `{"model", "content": [{"type": "text", "text": "<prompt> --ratio 16:9 --duration 5"}]}`
//! → `{"id": "cgt-…"}`; `GET …/tasks/{id}` → `{"status": queued|running|
//! succeeded|failed|cancelled|expired, "content": {"video_url"}, "error":
//! {"code", "message"}}`; `DELETE …/tasks/{id}` cancels a queued task, and
//! deletes a finished one's record, its video with it (so a cancel asks
//! first).
//!
//! Output options travel as text commands after the prompt, so a prompt
//! that carries its own commands is refused (it could buy a longer video
//! than the one priced).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiKey, EndpointSettings, ErrorDetail, Http, KeyStyle, Output, Params, Polled, ProviderError,
    ProviderRequest, SettingsError, Started, codes, is_token, parameters, refine_code,
    required_prompt, str_field, truncate,
};

pub const NAME: &str = "seedance";
pub const BASE_URL: &str = "https://ark.ap-southeast.bytepluses.com";
pub const DEFAULT_MODEL: &str = "seedance-1-0-pro-250528";
pub const DEFAULT_RATIO: &str = "16:9";
pub const DEFAULT_DURATION_S: i64 = 5;
/// The resolution a video is made at, and priced by, when none is asked
/// for: the highest, so that a default is never made at more than it was
/// paid for (the lite models' own default is 720p, the pro models' 1080p).
pub const DEFAULT_RESOLUTION: &str = "1080p";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

const TASKS: &str = "api/v3/contents/generations/tasks";
const ALLOWED: &[&str] = &[
    "model",
    "ratio",
    "aspect_ratio",
    "duration",
    "resolution",
    "seed",
    "camera_fixed",
    "camerafixed",
    "watermark",
];
const RATIOS: &[&str] = &["16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive"];
const RESOLUTIONS: &[&str] = &["480p", "720p", "1080p"];
/// Seedance's text commands, long and short forms.
const COMMANDS: &[&str] = &[
    "ratio",
    "rt",
    "duration",
    "dur",
    "frames",
    "resolution",
    "rs",
    "fps",
    "seed",
    "camerafixed",
    "cf",
    "watermark",
    "wm",
];

#[derive(Debug, Clone)]
pub struct SeedanceClient {
    http: Http,
    /// The models offered (see `super::offered_model`).
    models: Vec<String>,
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

#[derive(Deserialize)]
struct Task {
    status: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

impl SeedanceClient {
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

    /// Parameters: `model`, `ratio` (or `aspect_ratio`; default 16:9),
    /// `duration` (seconds, 2–12; default 5), `resolution` (480p/720p/1080p;
    /// default 1080p),
    /// `seed`, `camera_fixed`, `watermark`.
    pub async fn start(&self, req: &ProviderRequest) -> Result<Started, ProviderError> {
        let prompt = required_prompt(req, "prompt")?.trim();
        if carries_commands(prompt) {
            return Err(ProviderError::invalid(
                "the prompt may not contain --commands; use parameters",
            ));
        }
        let p = parameters(req, ALLOWED)?;
        let model = self.model(&req.parameters)?;
        let ratio = match p.one_of("ratio", RATIOS)? {
            Some(r) => r,
            None => p.one_of("aspect_ratio", RATIOS)?.unwrap_or(DEFAULT_RATIO),
        };
        let duration = p.integer("duration", 2..=12)?.unwrap_or(DEFAULT_DURATION_S);
        let mut text = format!("{prompt} --ratio {ratio} --duration {duration}");
        // Always sent: the price was the resolution's (see `resolution`).
        text.push_str(&format!(" --resolution {}", resolution(&p)?));
        if let Some(seed) = p.integer("seed", -1..=4_294_967_295)? {
            text.push_str(&format!(" --seed {seed}"));
        }
        let fixed = match p.boolean("camera_fixed")? {
            Some(b) => Some(b),
            None => p.boolean("camerafixed")?,
        };
        if let Some(fixed) = fixed {
            text.push_str(&format!(" --camerafixed {fixed}"));
        }
        if let Some(watermark) = p.boolean("watermark")? {
            text.push_str(&format!(" --watermark {watermark}"));
        }
        let body = json!({
            "model": model,
            "content": [{"type": "text", "text": text}],
        });
        let request = self
            .http
            .client
            .post(self.http.url(TASKS))
            .headers(self.http.auth())
            .json(&body);
        let response = self.http.send("create_task", request).await?;
        if !response.status().is_success() {
            return Err(self.http.failure("create_task", response, read_error).await);
        }
        let created: Created = self.http.json(response).await?;
        if !is_task_id(&created.id) {
            return Err(ProviderError::permanent(
                codes::PROVIDER_ERROR,
                "seedance: unexpected task id",
            ));
        }
        tracing::info!(provider = NAME, task_id = %created.id, "task created");
        Ok(Started::Pending { handle: created.id })
    }

    async fn task(&self, handle: &str) -> Result<Task, ProviderError> {
        if !is_task_id(handle) {
            return Err(bad_handle());
        }
        let request = self
            .http
            .client
            .get(self.http.url(&format!("{TASKS}/{handle}")))
            .headers(self.http.auth());
        let response = self.http.send("get_task", request).await?;
        if !response.status().is_success() {
            return Err(self.http.failure("get_task", response, read_error).await);
        }
        self.http.json(response).await
    }

    pub async fn poll(&self, handle: &str) -> Result<Polled, ProviderError> {
        let task = self.task(handle).await?;
        match task.status.as_str() {
            "queued" | "running" => Ok(Polled::Running),
            "succeeded" => {
                let url = task
                    .content
                    .as_ref()
                    .and_then(|c| str_field(c, "video_url"))
                    .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
                    .ok_or_else(|| {
                        ProviderError::permanent(
                            codes::PROVIDER_ERROR,
                            "seedance: succeeded task has no video_url",
                        )
                    })?;
                Ok(Polled::Done(Output::MediaUrl {
                    url: url.to_owned(),
                    content_type: Some("video/mp4".to_owned()),
                }))
            }
            "failed" => {
                let error = task.error.unwrap_or(Value::Null);
                let code = str_field(&error, "code").unwrap_or("unknown");
                let message = str_field(&error, "message").unwrap_or("task failed");
                Err(ProviderError::permanent(
                    refine_code(code).unwrap_or(codes::PROVIDER_ERROR),
                    format!(
                        "seedance: task failed: {}: {}",
                        truncate(code, 60),
                        truncate(message, 200)
                    ),
                ))
            }
            "cancelled" => Err(ProviderError::permanent(
                codes::CANCELLED,
                "seedance: task was cancelled",
            )),
            "expired" => Err(ProviderError::permanent(
                codes::PROVIDER_ERROR,
                "seedance: task expired at the provider",
            )),
            other => Err(ProviderError::permanent(
                codes::PROVIDER_ERROR,
                format!("seedance: unknown task status {}", truncate(other, 40)),
            )),
        }
    }

    /// Only a queued task can be cancelled; a running or finished one, or
    /// an unknown id, leaves nothing to do: `Ok(())`. The task is read
    /// first: the same `DELETE` deletes a finished task's record, and with
    /// it a video that may have just been made (and will be billed). When
    /// the task cannot be read, nothing is sent.
    pub async fn cancel(&self, handle: &str) -> Result<(), ProviderError> {
        match self.task(handle).await {
            Ok(task) if task.status == "queued" => {}
            Ok(_) => return Ok(()),
            Err(ProviderError::Permanent { code, .. }) if code == codes::NOT_FOUND => {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        let request = self
            .http
            .client
            .delete(self.http.url(&format!("{TASKS}/{handle}")))
            .headers(self.http.auth());
        let response = self.http.send("cancel_task", request).await?;
        let status = response.status();
        if status.is_success() || matches!(status.as_u16(), 400 | 404 | 409) {
            return Ok(());
        }
        Err(self.http.failure("cancel_task", response, read_error).await)
    }
}

fn is_task_id(id: &str) -> bool {
    is_token(id, "-_", 128)
}

fn bad_handle() -> ProviderError {
    ProviderError::permanent(codes::NOT_FOUND, "seedance: not a task id")
}

/// The resolution `p` asks for, or the default. BytePlus bills a video by
/// its tokens, which grow with its pixels (1080p about five times 480p),
/// so a video is priced by its resolution too (`super::price_tier`).
pub(crate) fn resolution(p: &Params<'_>) -> Result<&'static str, ProviderError> {
    Ok(p.one_of("resolution", RESOLUTIONS)?
        .unwrap_or(DEFAULT_RESOLUTION))
}

/// Does the prompt contain a Seedance text command (`--ratio`, `--rs` …)?
/// Found anywhere, not only as a word of its own (`a fox,--rs 1080p`):
/// a command that bought a higher resolution or a longer video than the
/// one priced would be paid for by the service.
fn carries_commands(prompt: &str) -> bool {
    let lower = prompt.to_ascii_lowercase();
    lower.match_indices("--").any(|(at, _)| {
        let name: String = lower[at + 2..]
            .trim_start_matches('-')
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        COMMANDS.contains(&name.as_str())
    })
}

/// ModelArk errors: `{"error": {"code", "message", "param", "type"}}`.
pub(crate) fn read_error(body: &Value) -> ErrorDetail {
    let error = body.get("error").unwrap_or(body);
    let code = str_field(error, "code").map(|c| truncate(c, 80));
    ErrorDetail {
        refined: code.as_deref().and_then(refine_code),
        code,
        message: str_field(error, "message").map(|m| truncate(m, 200)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_in_prompts_are_found() {
        assert!(carries_commands("a cat --duration 12"));
        assert!(carries_commands("a cat --RS 1080p"));
        assert!(!carries_commands("a cat -- running fast"));
        assert!(!carries_commands("a cat with a --long-tail"));
        assert!(carries_commands("a fox,--rs 1080p"));
        assert!(carries_commands("a fox.--Resolution 1080p"));
        assert!(carries_commands("a fox ---dur 12"));
        assert!(carries_commands("a fox--ratio 21:9"));
        assert!(!carries_commands("a fox -- 1080p -- red"));
        assert!(!carries_commands("a road--rsvp"));
    }

    #[test]
    fn sensitive_content_codes_are_content_policy() {
        let body = serde_json::json!({"error": {"code": "InputTextSensitiveContentDetected", "message": "m", "type": "BadRequest"}});
        assert_eq!(read_error(&body).refined, Some(codes::CONTENT_POLICY));
        let body = serde_json::json!({"error": {"code": "InvalidParameter", "message": "m"}});
        assert_eq!(read_error(&body).refined, None);
    }
}
