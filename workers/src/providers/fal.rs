//! Fal.ai queue API (video models).
//!
//! `POST {base}/{model_id}` with `Authorization: Key <key>` and the model's
//! input → `{request_id, status_url, response_url, cancel_url}`. Status,
//! result and cancel live under the model's *app* id (`owner/app`, without
//! the sub-path of ids such as `fal-ai/kling-video/v2.1/master/text-to-video`):
//! `GET {base}/{app}/requests/{id}/status`, `GET {base}/{app}/requests/{id}`,
//! `PUT {base}/{app}/requests/{id}/cancel`. The handle is that relative path,
//! `{owner}/{app}/requests/{request_id}`.
//!
//! A request that fails at the model still ends `COMPLETED`; its error comes
//! with the result (e.g. 422 with `detail[].type = content_policy_violation`).

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use super::{
    ApiKey, EndpointSettings, ErrorDetail, Http, KeyStyle, Output, Polled, ProviderError,
    ProviderRequest, SettingsError, Started, codes, is_token, refine_code, required_prompt,
    str_field, truncate,
};

pub const NAME: &str = "fal";
pub const BASE_URL: &str = "https://queue.fal.run";
/// Used when `parameters.model` is absent.
pub const DEFAULT_MODEL: &str = "fal-ai/kling-video/v2.1/master/text-to-video";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct FalClient {
    http: Http,
    /// The models offered (`FAL_MODELS`), the first the default; empty:
    /// [`DEFAULT_MODEL`] alone.
    models: Vec<String>,
}

#[derive(Deserialize)]
struct Submitted {
    request_id: String,
    #[serde(default)]
    response_url: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    status: String,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    error_type: Option<String>,
}

impl FalClient {
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
                    header: "authorization",
                    prefix: "Key ",
                    required: true,
                },
            )?,
            models: settings.models.clone(),
        })
    }

    /// The model `parameters` ask for (`model`; the default when absent),
    /// if it is well formed and offered. Only the operator's models are:
    /// a model id names any app on Fal, another account's included, whose
    /// price is not this service's, and whose answer says where the result
    /// is fetched from.
    pub(crate) fn model(&self, parameters: &Value) -> Result<String, ProviderError> {
        let model = super::offered_model(parameters, &["model"], &self.models, DEFAULT_MODEL)?;
        if app_id(&model).is_none() {
            return Err(ProviderError::invalid(
                "model must look like owner/app[/path]",
            ));
        }
        Ok(model)
    }

    /// Submit to the queue. `parameters.model` picks the model; every other
    /// parameter is the model's own input and goes through as is (Fal
    /// validates it against the model's schema: 422 → `invalid_parameters`).
    pub async fn start(&self, req: &ProviderRequest) -> Result<Started, ProviderError> {
        let prompt = required_prompt(req, "prompt")?;
        let mut input = match &req.parameters {
            Value::Null => serde_json::Map::new(),
            Value::Object(m) => m.clone(),
            _ => return Err(ProviderError::invalid("parameters must be a JSON object")),
        };
        let model = self.model(&req.parameters)?;
        input.remove("model");
        // The result comes through the queue, from Fal's CDN: `sync_mode`
        // would put it in the answer as a data URI instead, which is
        // refused after Fal has billed for it.
        input.remove("sync_mode");
        let app = app_id(&model)
            .ok_or_else(|| ProviderError::invalid("model must look like owner/app[/path]"))?;
        if input.contains_key("prompt") {
            return Err(ProviderError::invalid(
                "the prompt goes in the request's prompt, not in parameters",
            ));
        }
        input.insert("prompt".into(), Value::String(prompt.to_owned()));

        let request = self
            .http
            .client
            .post(self.http.url(&model))
            .headers(self.http.auth())
            .json(&input);
        let response = self.http.send("submit", request).await?;
        if !response.status().is_success() {
            return Err(self.http.failure("submit", response, read_error).await);
        }
        let submitted: Submitted = self.http.json(response).await?;
        if !is_token(&submitted.request_id, "-_", 128) {
            return Err(ProviderError::permanent(
                codes::PROVIDER_ERROR,
                "fal: unexpected request id",
            ));
        }
        // Fal's own response_url is authoritative for where the request
        // lives; use it when it is under our base, else derive it.
        let handle = submitted
            .response_url
            .as_deref()
            .and_then(|u| u.strip_prefix(self.http.base.as_str()))
            .filter(|h| parse_handle(h).is_some_and(|(_, id)| id == submitted.request_id))
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{app}/requests/{}", submitted.request_id));
        Ok(Started::Pending { handle })
    }

    pub async fn poll(&self, handle: &str) -> Result<Polled, ProviderError> {
        let (path, _) = parse_handle(handle).ok_or_else(bad_handle)?;
        let request = self
            .http
            .client
            .get(self.http.url(&format!("{path}/status")))
            .headers(self.http.auth());
        let response = self.http.send("status", request).await?;
        if !response.status().is_success() {
            return Err(self.http.failure("status", response, read_error).await);
        }
        let status: Status = self.http.json(response).await?;
        match status.status.as_str() {
            "IN_QUEUE" | "IN_PROGRESS" => Ok(Polled::Running),
            "COMPLETED" => {
                if let Some(error) = status.error.filter(|e| !e.is_null()) {
                    return Err(completed_with_error(&error, status.error_type.as_deref()));
                }
                self.result(path).await.map(Polled::Done)
            }
            "CANCELED" | "CANCELLED" => Err(ProviderError::permanent(
                codes::CANCELLED,
                "fal: request was cancelled",
            )),
            other => Err(ProviderError::permanent(
                codes::PROVIDER_ERROR,
                format!("fal: request ended with status {}", truncate(other, 40)),
            )),
        }
    }

    async fn result(&self, path: &str) -> Result<Output, ProviderError> {
        let request = self
            .http
            .client
            .get(self.http.url(path))
            .headers(self.http.auth());
        let response = self.http.send("result", request).await?;
        if !response.status().is_success() {
            return Err(self.http.failure("result", response, read_error).await);
        }
        let result: Value = self.http.json(response).await?;
        let video = result.get("video").ok_or_else(|| {
            ProviderError::permanent(codes::PROVIDER_ERROR, "fal: result has no video")
        })?;
        let url = str_field(video, "url")
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .ok_or_else(|| {
                ProviderError::permanent(codes::PROVIDER_ERROR, "fal: result video has no URL")
            })?;
        Ok(Output::MediaUrl {
            url: url.to_owned(),
            content_type: str_field(video, "content_type")
                .map(str::to_owned)
                .or_else(|| Some("video/mp4".to_owned())),
        })
    }

    /// Ask Fal to cancel. A request that already finished or is unknown
    /// leaves nothing to cancel: `Ok(())`.
    pub async fn cancel(&self, handle: &str) -> Result<(), ProviderError> {
        let (path, _) = parse_handle(handle).ok_or_else(bad_handle)?;
        let request = self
            .http
            .client
            .put(self.http.url(&format!("{path}/cancel")))
            .headers(self.http.auth());
        let response = self.http.send("cancel", request).await?;
        let status = response.status();
        if status.is_success() || matches!(status.as_u16(), 400 | 404 | 409 | 410) {
            return Ok(());
        }
        Err(self.http.failure("cancel", response, read_error).await)
    }
}

/// `owner/app` of a model id `owner/app[/sub/path]`, if it is well formed.
fn app_id(model: &str) -> Option<String> {
    let segments: Vec<&str> = model.split('/').collect();
    let ok = segments.len() >= 2
        && segments.len() <= 8
        && segments
            .iter()
            .all(|s| is_token(s, "._-", 100) && *s != "." && *s != ".." && *s != "requests");
    ok.then(|| format!("{}/{}", segments[0], segments[1]))
}

/// `owner/app/requests/id` → (the path, the request id).
fn parse_handle(handle: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = handle.split('/').collect();
    match parts.as_slice() {
        [owner, app, "requests", id]
            if [owner, app]
                .iter()
                .all(|s| is_token(s, "._-", 100) && **s != "." && **s != "..")
                && is_token(id, "-_", 128) =>
        {
            Some((handle, id))
        }
        _ => None,
    }
}

fn bad_handle() -> ProviderError {
    ProviderError::permanent(codes::NOT_FOUND, "fal: not a fal request handle")
}

fn completed_with_error(error: &Value, error_type: Option<&str>) -> ProviderError {
    let message = error
        .as_str()
        .map(str::to_owned)
        .or_else(|| str_field(error, "message").map(str::to_owned))
        .unwrap_or_else(|| "request failed".to_owned());
    let code = error_type
        .and_then(refine_code)
        .unwrap_or(codes::PROVIDER_ERROR);
    ProviderError::permanent(code, format!("fal: {}", truncate(&message, 200)))
}

/// Fal's error bodies: model errors `{"detail": [{"loc","msg","type"}]}`,
/// request errors `{"detail": "…", "error_type": "…"}`, and older
/// `{"detail": {"error": "…", "message": "…"}}`.
fn read_error(body: &Value) -> ErrorDetail {
    let mut detail = ErrorDetail::default();
    match body.get("detail") {
        Some(Value::Array(items)) => {
            let types: Vec<&str> = items.iter().filter_map(|i| str_field(i, "type")).collect();
            detail.refined = types.iter().find_map(|t| refine_code(t));
            detail.code = types.first().map(|t| truncate(t, 60));
            detail.message = items
                .first()
                .and_then(|i| str_field(i, "msg"))
                .map(|m| truncate(m, 200));
        }
        Some(Value::String(s)) => detail.message = Some(truncate(s, 200)),
        Some(obj @ Value::Object(_)) => {
            detail.code = str_field(obj, "error")
                .or_else(|| str_field(obj, "type"))
                .map(|c| truncate(c, 60));
            detail.message = str_field(obj, "message").map(|m| truncate(m, 200));
        }
        _ => {}
    }
    if let Some(t) = str_field(body, "error_type") {
        detail.code.get_or_insert_with(|| truncate(t, 60));
    }
    if detail.refined.is_none() {
        detail.refined = detail.code.as_deref().and_then(refine_code);
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_id_drops_the_sub_path() {
        assert_eq!(
            app_id("fal-ai/kling-video/v2.1/master/text-to-video").as_deref(),
            Some("fal-ai/kling-video")
        );
        assert_eq!(
            app_id("fal-ai/fast-sdxl").as_deref(),
            Some("fal-ai/fast-sdxl")
        );
        for bad in ["fal-ai", "fal-ai/../x", "a/b?c", "a//b", "a/requests/x", ""] {
            assert_eq!(app_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn handles_parse() {
        assert!(parse_handle("fal-ai/kling-video/requests/abc-123").is_some());
        for bad in [
            "fal-ai/kling-video/abc",
            "fal-ai/../requests/x",
            "a/b/requests/x/y",
            "a/b/requests/x?y",
            "",
        ] {
            assert!(parse_handle(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn content_policy_in_model_errors() {
        let body = serde_json::json!({"detail": [{"loc": ["body", "prompt"], "msg": "flagged", "type": "content_policy_violation"}]});
        assert_eq!(read_error(&body).refined, Some(codes::CONTENT_POLICY));
    }
}
