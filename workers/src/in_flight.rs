//! Jobs that outlive their worker.
//!
//! When PostgreSQL goes away, a queue's worker in a surviving `slate work`
//! fails (its heartbeat or fetch errors) and is started again under a new
//! name (`runtime::Instances::name`). The jobs it had started do not stop: a
//! generation runs on its own task (`.parallelize`), and goes on waiting for
//! its provider. Its job row still names the old worker, which no longer
//! heartbeats, so once PostgreSQL is back the row looked orphaned after
//! `missed_heartbeats` beats and the job was run a second time beside the
//! first. A provider without an idempotency key (Fal) was then paid twice
//! when the first run had not yet recorded its handle (docs/CHAOS.md).
//!
//! So the process keeps a name alive for as long as one of its jobs runs:
//! [`InFlight::layer`] counts each worker's running jobs by the name that
//! took them, [`InFlight::retire`] marks a failed worker's name, and every
//! heartbeat of the same queue ([`crate::queue`]) stamps the retired names
//! that still have jobs running, in the transaction that then looks for
//! orphans. When their last job ends, the name is let go.
//!
//! A job's completion normally reaches its row through its worker (apalis's
//! persistence layer hands it to the worker's state machine, which runs
//! [`crate::queue`]'s `handle_events`). A failed worker's is gone, so a job
//! that finishes under a retired name records its own completion, from the
//! job's task, before the name is let go ([`InFlight::recording_to`]).
//! Until the twenty-second session the row stayed behind, was taken for an
//! orphan once the name was let go, and was run again (a generation's
//! re-run found its work done and ended at once, one attempt more).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use apalis::prelude::WorkerContext;
use apalis_core::backend::TaskResult;
use apalis_core::layers::{Layer, Service};
use apalis_core::task::{ExecutionContext, Task};
use serde::Serialize;
use sqlx::PgPool;

/// The running jobs of one process's workers, by worker name. Cheap to
/// clone; clones share the count.
#[derive(Clone, Debug, Default)]
pub struct InFlight {
    names: Arc<Mutex<HashMap<String, Name>>>,
    /// Where a job that outlived its worker records its completion.
    pool: Option<PgPool>,
}

#[derive(Debug, Default)]
struct Name {
    running: usize,
    /// Its worker has failed and been replaced.
    retired: bool,
}

impl InFlight {
    pub fn new() -> Self {
        Self::default()
    }

    /// [`new`](Self::new), and a job that finishes under a retired name
    /// records its completion in `pool`'s queue table itself: its worker,
    /// which would have, is gone.
    pub fn recording_to(pool: PgPool) -> Self {
        Self {
            pool: Some(pool),
            ..Self::default()
        }
    }

    /// Counts the jobs a worker runs. Give it to the worker's builder as
    /// its innermost layer (after `.parallelize`), so that it counts inside
    /// the job's own task, which outlives the worker.
    pub fn layer(&self) -> InFlightLayer {
        InFlightLayer(self.clone())
    }

    /// The worker named `name` has failed and will not heartbeat again:
    /// keep its name alive while its jobs run on.
    pub fn retire(&self, name: &str) {
        let mut names = self.lock();
        if let Some(n) = names.get_mut(name) {
            n.retired = true;
            tracing::info!(
                worker = name,
                running = n.running,
                "worker ended with jobs still running; keeping its name alive until they finish"
            );
        }
    }

    /// Names whose worker has been replaced while some of their jobs still
    /// run here.
    pub fn retired(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, n)| n.retired)
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn is_retired(&self, name: &str) -> bool {
        self.lock().get(name).is_some_and(|n| n.retired)
    }

    /// Record the outcome of a job that finished under `name` after its
    /// worker had failed: what that worker's `handle_events` would have
    /// written ([`crate::queue::complete_one`], which changes the row only
    /// while it is still locked by `name`). PostgreSQL may be out of reach
    /// (an outage is what fails workers): tried again as a generation's
    /// records are (`generations::while_out_of_reach`, up to a minute), the
    /// name kept alive meanwhile. If that fails too, or fails otherwise, the
    /// row is left for the orphan check, as it was before.
    async fn record_for_gone_worker(&self, name: &str, result: TaskResult<serde_json::Value>) {
        let Some(pool) = &self.pool else { return };
        let recorded = crate::generations::while_out_of_reach("record_for_gone_worker", || {
            crate::queue::complete_one(pool, &result, name)
        })
        .await;
        match recorded {
            Ok(recorded) => tracing::info!(
                worker = name,
                job = %result.task_id,
                status = ?result.status,
                recorded,
                "a job of an ended worker finished; its completion recorded by the job itself"
            ),
            Err(e) => tracing::warn!(
                worker = name,
                job = %result.task_id,
                error = %format_args!("{e:#}"),
                "could not record a job of an ended worker; its row is left for the orphan check"
            ),
        }
    }

    /// How many jobs run under `name`.
    #[cfg(test)]
    fn running(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, |n| n.running)
    }

    fn enter(&self, name: &str) -> Running {
        self.lock().entry(name.to_owned()).or_default().running += 1;
        Running {
            in_flight: self.clone(),
            name: name.to_owned(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Name>> {
        // The map stays consistent whatever panicked while it was held.
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One running job; counted out when dropped (finished, failed, panicked or
/// dropped with its worker).
struct Running {
    in_flight: InFlight,
    name: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut names = self.in_flight.lock();
        let Some(n) = names.get_mut(&self.name) else {
            return;
        };
        n.running -= 1;
        if n.running == 0 {
            if n.retired {
                tracing::info!(
                    worker = %self.name,
                    "the last job of an ended worker finished; its name is let go"
                );
            }
            names.remove(&self.name);
        }
    }
}

#[derive(Clone)]
pub struct InFlightLayer(InFlight);

impl<S> Layer<S> for InFlightLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            in_flight: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    in_flight: InFlight,
}

impl<S, Args> Service<Task<Args>> for Counted<S>
where
    S: Service<Task<Args>>,
    S::Future: Send + 'static,
    S::Response: Serialize + Send,
    S::Error: std::fmt::Display + Send,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        // The worker's context as the task carries it: the name it had when
        // it took the job (a restarted worker's context has a new one).
        let running = task
            .data()
            .get::<WorkerContext>()
            .map(|worker| self.in_flight.enter(worker.name()));
        let ctx = task.ctx().clone();
        let job = self.inner.call(task);
        let in_flight = self.in_flight.clone();
        Box::pin(async move {
            let outcome = job.await;
            if let Some(running) = &running
                && in_flight.is_retired(&running.name)
                && let Some(result) = task_result(&ctx, &outcome)
            {
                in_flight
                    .record_for_gone_worker(&running.name, result)
                    .await;
            }
            drop(running);
            outcome
        })
    }
}

/// What apalis's persistence layer sends its worker when a job ends: the
/// status its lifecycle set (done, failed, killed, or pending for a retry
/// later), the attempt, and the encoded response or the error's message.
fn task_result<R: Serialize, E: std::fmt::Display>(
    ctx: &ExecutionContext,
    outcome: &Result<R, E>,
) -> Option<TaskResult<serde_json::Value>> {
    let result = match outcome {
        Ok(response) => serde_json::to_value(response).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    Some(TaskResult {
        task_id: ctx.task_id()?.clone(),
        attempt: ctx.attempt(),
        status: ctx.status(),
        result,
    })
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    #[test]
    fn a_name_is_kept_while_its_jobs_run_and_let_go_after() {
        let f = InFlight::new();
        let (a, b) = (f.enter("p.generations.0"), f.enter("p.generations.0"));
        let other = f.enter("p.generations.1");
        assert_eq!(f.running("p.generations.0"), 2);
        assert!(f.retired().is_empty(), "no worker has ended");
        f.retire("p.generations.0");
        f.retire("p.stripe"); // nothing running: nothing to keep
        assert_eq!(f.retired(), vec!["p.generations.0".to_owned()]);
        drop(a);
        assert_eq!(f.retired(), vec!["p.generations.0".to_owned()]);
        drop(b);
        assert!(f.retired().is_empty(), "its last job finished");
        assert_eq!(f.running("p.generations.0"), 0);
        // A name used again after it was let go starts unretired.
        let again = f.enter("p.generations.0");
        assert!(f.retired().is_empty());
        drop((again, other));
        assert!(f.names.lock().unwrap().is_empty());
    }
}
