//! The `slate.diagnostics` queue: jobs that exercise the worker pipeline end
//! to end (`slate jobs ping`), including one that panics, to prove that a
//! panicking job is contained and the worker keeps going.

use apalis::prelude::BoxDynError;
use serde::{Deserialize, Serialize};

pub const QUEUE: &str = "slate.diagnostics";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DiagnosticJob {
    /// Completes at once.
    Ping,
    /// Panics inside the handler.
    Panic,
    /// Returns an error (retried up to its attempts).
    Fail,
}

#[tracing::instrument(level = "error", skip_all, fields(job_id = %task_id, kind = ?job))]
pub async fn handle(
    job: DiagnosticJob,
    task_id: apalis::prelude::TaskId,
) -> Result<(), BoxDynError> {
    crate::jobs::contain(async move {
        match job {
            DiagnosticJob::Ping => {
                tracing::info!("diagnostic ping handled");
                Ok(())
            }
            DiagnosticJob::Panic => panic!("diagnostic panic requested"),
            DiagnosticJob::Fail => Err("diagnostic failure requested".into()),
        }
    })
    .await
}
