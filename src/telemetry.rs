//! One place for logging: `RUST_LOG` filters (default `info`), JSON or human
//! format. Request and response bodies, prompts and secrets are never logged.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    init_with(format, "info")
}

/// [`init`] with another level than `info` when `RUST_LOG` is not set
/// (`slate bench` defaults to `warn`: a line per job would be its own load).
pub fn init_with(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter(default_level));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The filter when `RUST_LOG` is not set.
fn default_filter(level: &str) -> EnvFilter {
    EnvFilter::new(format!("{level},sqlx=warn,aws=warn,hyper=warn"))
}

/// Panics go to the log as one structured line (message and location), not
/// as a backtrace on stderr.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(panic = %message, %location, "panic");
    }));
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `RUST_LOG=warn` (the bench's default) keeps a request's and a job's
    /// ids on their warnings: their spans are made at a level no filter
    /// short of `off` drops.
    #[test]
    fn a_warning_inside_a_request_or_a_job_keeps_its_id_at_warn_level() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(default_filter("warn"))
            .with_writer(move || out.clone())
            .json()
            .flatten_event(true)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let req = axum::http::Request::builder()
                .uri("/v1/generations")
                .header("x-request-id", "req-7f3a")
                .body(())
                .unwrap();
            crate::http::request_span(&req).in_scope(|| tracing::warn!("inside a request"));
            job_like_handler();
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["span"]["request_id"], "req-7f3a", "{text}");
        assert_eq!(lines[1]["span"]["job_id"], "job-01", "{text}");
    }

    /// As the job handlers are instrumented (`workers`).
    #[tracing::instrument(level = "error", skip_all, fields(job_id = "job-01"))]
    fn job_like_handler() {
        tracing::warn!("inside a job");
    }
}
