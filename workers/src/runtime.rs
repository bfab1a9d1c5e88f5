//! `slate work`: the apalis worker monitor, the asynchronous projectors and
//! the credit sweeper, until a shutdown signal.

use std::future::Future;
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::Config;
use slate_events::projections::{self, Projection};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::diagnostics::{self, DiagnosticJob};
use crate::email::{self, EmailJob, EmailWorker, Mailer};
use crate::generations::{self, GenerationJob, GenerationWorker};
use crate::in_flight::{InFlight, InFlightLayer};
use crate::providers::{ProviderSettings, Providers};
use crate::purge::{self, PurgeJob, Purger, SubscriptionCanceller};
use crate::renewal::{self, RenewalJob, RenewalSetter, Renewals};
use crate::storage::{Storage, StorageSettings};
use crate::stripe::{self, StripeJob, StripeWorker};
use crate::sweeper;
use crate::webhooks::{self, WebhookJob, WebhookWorker};
use slate_events::stripe::StripeCatalog;
use std::sync::Arc;

#[derive(Clone)]
pub struct WorkerSettings {
    /// Unique per process: a restarted worker under an old name would find
    /// its jobs still marked as its own.
    pub worker_name: String,
    /// A worker that misses `missed_heartbeats` beats is declared dead and
    /// its jobs go back to the queue (by a worker that has itself been up
    /// that long, `crate::queue`).
    pub heartbeat: Duration,
    pub missed_heartbeats: usize,
    pub sweep_interval: Duration,
    /// How long finished jobs stay in the queue's table.
    pub job_retention: crate::jobs::Retention,
    /// How long in-flight jobs get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Credits per Stripe price.
    pub stripe_catalog: StripeCatalog,
    /// Fault injection for crash tests (never set in production).
    pub fault_stripe_hold: Option<Duration>,
    /// Asks Stripe for an object's current state when events are in doubt.
    pub stripe_refetch: Option<slate_events::stripe::Refetcher>,
    /// Generation jobs.
    pub providers: Arc<Providers>,
    pub storage: StorageSettings,
    pub generation_attempts: usize,
    pub generation_concurrency: usize,
    /// Workers (each with its own fetch loop) that share the generation
    /// concurrency; see [`split_concurrency`].
    pub generation_fetchers: usize,
    /// Jobs one process runs at once on the Stripe, completion-webhook,
    /// email and purge queues (each fetches only for its free slots).
    pub stripe_concurrency: usize,
    pub webhook_concurrency: usize,
    pub email_concurrency: usize,
    pub purge_concurrency: usize,
    /// Results' size cap and the memory results in flight may hold.
    pub downloads: generations::Downloads,
    pub poll_interval: Duration,
    /// Webhook hosts allowed even though they resolve to private addresses.
    pub webhook_allow: Vec<String>,
    /// Hosts providers' results may be fetched from although they resolve
    /// to private addresses or serve plain http.
    pub media_allow: Vec<String>,
    /// Transactional email (none: messages are skipped with a warning).
    pub mailer: Option<Mailer>,
    /// Cancels Stripe subscriptions when an account is purged.
    pub stripe_cancel: Option<SubscriptionCanceller>,
    /// Stops and resumes subscriptions' renewal when an account is deleted
    /// or restored.
    pub stripe_renewal: Option<RenewalSetter>,
}

impl WorkerSettings {
    pub fn new(worker_name: String, storage: StorageSettings) -> Self {
        Self {
            worker_name,
            heartbeat: Duration::from_secs(5),
            missed_heartbeats: 3,
            sweep_interval: Duration::from_secs(30),
            job_retention: crate::jobs::Retention::default(),
            shutdown_grace: Duration::from_secs(30),
            stripe_catalog: StripeCatalog::default(),
            fault_stripe_hold: None,
            stripe_refetch: None,
            providers: Arc::new(
                Providers::new(&ProviderSettings::default())
                    .expect("the local provider needs no settings"),
            ),
            storage,
            generation_attempts: 5,
            generation_concurrency: GENERATION_CONCURRENCY,
            generation_fetchers: GENERATION_FETCHERS,
            stripe_concurrency: STRIPE_CONCURRENCY,
            webhook_concurrency: WEBHOOK_CONCURRENCY,
            email_concurrency: EMAIL_CONCURRENCY,
            purge_concurrency: PURGE_CONCURRENCY,
            downloads: generations::Downloads::new(RESULT_LIMIT, RESULT_MEMORY),
            poll_interval: Duration::from_secs(2),
            webhook_allow: Vec::new(),
            media_allow: Vec::new(),
            mailer: None,
            stripe_cancel: None,
            stripe_renewal: None,
        }
    }

    fn queue_config(&self, queue: &str) -> Config {
        Config::default()
            .queue(queue)
            .heartbeat_interval(self.heartbeat)
            .missed_heartbeats(self.missed_heartbeats)
            .batch_size(10)
    }
}

/// Run until `shutdown` resolves, then stop taking jobs, let in-flight ones
/// finish (up to the grace period) and stop the background loops.
pub async fn run<S>(pool: PgPool, settings: WorkerSettings, shutdown: S) -> anyhow::Result<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut background = Vec::new();
    let tail = slate_events::tail::watch(pool.clone(), slate_events::tail::INTERVAL);
    for &p in Projection::ASYNC {
        background.push(tokio::spawn(projections::run_projector(
            pool.clone(),
            p,
            tail.clone(),
            stop_rx.clone(),
        )));
    }
    background.push(tokio::spawn(sweep_loop(
        pool.clone(),
        settings.sweep_interval,
        stop_rx.clone(),
    )));

    // The queues' own bookkeeping commits without waiting for the disk.
    let queue_pool = crate::poll::queue_pool(&pool);
    // One LISTEN connection wakes every queue's workers.
    let wakeups = crate::poll::Wakeups::start(pool.clone());
    // Every worker counts its running jobs, so that a failed worker's name
    // stays alive while they run on (see `crate::in_flight`).
    let in_flight = InFlight::recording_to(queue_pool.clone());
    let workers = Instances {
        process: settings.worker_name.clone(),
        in_flight: in_flight.clone(),
    };
    let diagnostics_storage = storage::<DiagnosticJob>(
        &wakeups,
        &queue_pool,
        &settings,
        &in_flight,
        diagnostics::QUEUE,
    );
    let stripe_storage =
        storage::<StripeJob>(&wakeups, &queue_pool, &settings, &in_flight, stripe::QUEUE);
    let stripe_worker = StripeWorker {
        pool: pool.clone(),
        catalog: settings.stripe_catalog.clone(),
        options: slate_events::stripe::ProcessOptions {
            force: false,
            refetch: settings.stripe_refetch.clone(),
            hold_before_commit: settings.fault_stripe_hold,
        },
    };
    let generation_storage = storage::<GenerationJob>(
        &wakeups,
        &queue_pool,
        &settings,
        &in_flight,
        generations::QUEUE,
    );
    let generation_worker = GenerationWorker {
        pool: pool.clone(),
        providers: settings.providers.clone(),
        storage: Storage::new(&settings.storage),
        max_attempts: settings.generation_attempts,
        poll_interval: settings.poll_interval,
        poll_timeout: Duration::from_secs(30 * 60),
        downloads: settings.downloads.clone(),
        http: generations::media_client()?,
        media_allow: settings.media_allow.clone(),
    };
    let webhook_storage = storage::<WebhookJob>(
        &wakeups,
        &queue_pool,
        &settings,
        &in_flight,
        webhooks::QUEUE,
    );
    let webhook_worker = WebhookWorker::new(pool.clone(), settings.webhook_allow.clone())?;
    let webhook_workers = workers.clone();
    let maintenance_storage =
        storage::<sweeper::SweepJob>(&wakeups, &queue_pool, &settings, &in_flight, sweeper::QUEUE);
    let maintenance = sweeper::Maintenance {
        pool: pool.clone(),
        retention: settings.job_retention,
    };
    let email_storage =
        storage::<EmailJob>(&wakeups, &queue_pool, &settings, &in_flight, email::QUEUE);
    let email_worker = EmailWorker {
        pool: pool.clone(),
        mailer: settings.mailer.clone(),
    };
    let purge_storage =
        storage::<PurgeJob>(&wakeups, &queue_pool, &settings, &in_flight, purge::QUEUE);
    let purger = Purger {
        pool: pool.clone(),
        storage: Storage::new(&settings.storage),
        mailer: settings.mailer.clone(),
        stripe: settings.stripe_cancel.clone(),
        crash_after: None,
    };
    let renewal_storage =
        storage::<RenewalJob>(&wakeups, &queue_pool, &settings, &in_flight, renewal::QUEUE);
    let renewals = Renewals {
        pool: pool.clone(),
        stripe: settings.stripe_renewal.clone(),
    };
    let email_workers = workers.clone();
    let purge_workers = workers.clone();
    let renewal_workers = workers.clone();
    let maintenance_workers = workers.clone();
    let generation_slots = split_concurrency(
        settings.generation_concurrency,
        settings.generation_fetchers,
    );
    let diagnostics_workers = workers.clone();
    let stripe_slots = settings.stripe_concurrency.max(1);
    let webhook_slots = settings.webhook_concurrency.max(1);
    let email_slots = settings.email_concurrency.max(1);
    let purge_slots = settings.purge_concurrency.max(1);
    let retired = in_flight.clone();
    let stripe_workers = workers.clone();
    let generation_workers = workers.clone();
    // Set once the process stops taking jobs (a shutdown or the watchdog).
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let exits = stopping.clone();
    let monitor = Monitor::new()
        .register(move |restarts| {
            WorkerBuilder::new(diagnostics_workers.name("diagnostics", restarts))
                .backend(crate::poll::limited(
                    &diagnostics_storage,
                    DIAGNOSTICS_CONCURRENCY,
                ))
                .catch_panic()
                .concurrency(DIAGNOSTICS_CONCURRENCY)
                .layer(diagnostics_workers.counted())
                .build(diagnostics::handle)
        })
        .register(move |restarts| {
            WorkerBuilder::new(stripe_workers.name("stripe", restarts))
                .backend(crate::poll::limited(&stripe_storage, stripe_slots))
                .data(stripe_worker.clone())
                .catch_panic()
                .concurrency(stripe_slots)
                .layer(stripe_workers.counted())
                .build(stripe::handle)
        })
        .register_n(generation_slots.len(), move |index, restarts| {
            let queue = format!("generations.{index}");
            WorkerBuilder::new(generation_workers.name(&queue, restarts))
                .backend(crate::poll::limited(
                    &generation_storage,
                    generation_slots[index],
                ))
                .data(generation_worker.clone())
                .catch_panic()
                .concurrency(generation_slots[index])
                // Each generation on its own task: the handlers' CPU work
                // (media probing, S3 signing) runs on every core instead of
                // the worker's one task.
                .parallelize(tokio::spawn)
                .layer(generation_workers.counted())
                .build(generations::handle)
        })
        .register(move |restarts| {
            WorkerBuilder::new(maintenance_workers.name("maintenance", restarts))
                // One sweep at a time, fetched only when the slot is free
                // (the schedule already queues none while one waits or runs).
                .backend(crate::poll::limited(&maintenance_storage, 1))
                .data(maintenance.clone())
                .catch_panic()
                .concurrency(1)
                .layer(maintenance_workers.counted())
                .build(sweeper::handle)
        })
        .register(move |restarts| {
            WorkerBuilder::new(webhook_workers.name("webhooks", restarts))
                .backend(crate::poll::limited(&webhook_storage, webhook_slots))
                .data(webhook_worker.clone())
                .catch_panic()
                .concurrency(webhook_slots)
                .layer(webhook_workers.counted())
                .build(webhooks::handle)
        })
        .register(move |restarts| {
            WorkerBuilder::new(email_workers.name("email", restarts))
                .backend(crate::poll::limited(&email_storage, email_slots))
                .data(email_worker.clone())
                .catch_panic()
                .concurrency(email_slots)
                .layer(email_workers.counted())
                .build(email::handle)
        })
        .register(move |restarts| {
            WorkerBuilder::new(purge_workers.name("purge", restarts))
                .backend(crate::poll::limited(&purge_storage, purge_slots))
                .data(purger.clone())
                .catch_panic()
                .concurrency(purge_slots)
                .layer(purge_workers.counted())
                .build(purge::handle)
        })
        .register(move |restarts| {
            WorkerBuilder::new(renewal_workers.name("renewal", restarts))
                // Fetching one job for its one slot: a batch of 10 waiting
                // in apalis's buffer behind Stripe calls sent no heartbeat
                // (see `crate::queue`), and others could take the worker for
                // dead and call Stripe again for its jobs.
                .backend(crate::poll::limited(&renewal_storage, 1))
                .data(renewals.clone())
                .catch_panic()
                // Each job holds a connection while Stripe answers: one at a
                // time is plenty for deletions and restores.
                .concurrency(1)
                .layer(renewal_workers.counted())
                .build(renewal::handle)
        })
        // A worker whose backend fails (PostgreSQL restarting: a heartbeat
        // or a fetch errors) ends with an error; without a restart it stays
        // ended, and once every queue's worker has, the monitor returns. So
        // every failed worker is started again, under a new name (see
        // `Instances::name`), while jobs it had started may run on: its old name
        // is kept alive until they end.
        .should_restart(move |ctx, error| {
            tracing::warn!(worker = ctx.name(), %error, "job worker failed; restarting it");
            retired.retire(ctx.name());
            true
        })
        .shutdown_timeout(settings.shutdown_grace)
        // A worker that ends without an error is not restarted: its queue
        // has lost this process's worker until the watchdog notices. apalis
        // ends a worker that way when its service says it can no longer
        // take jobs (`CallAll`: an error from `poll_ready` is not a backend
        // error); say so when it happens.
        .on_event(move |ctx, event| {
            if matches!(event, apalis::prelude::Event::Exit)
                && !exits.load(std::sync::atomic::Ordering::SeqCst)
            {
                tracing::warn!(
                    worker = ctx.name(),
                    "a job worker ended without an error while the process runs; it is not restarted"
                );
            }
        });

    tracing::info!(worker = %settings.worker_name, "worker started");
    let stop_tx = Arc::new(stop_tx);
    let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop_signal, requested_signal) = (stop_tx.clone(), requested.clone());
    let stale_after = settings.heartbeat * (settings.missed_heartbeats.max(1) as u32) * 10;
    let silent = watchdog(
        pool.clone(),
        settings.worker_name.clone(),
        in_flight,
        settings.heartbeat,
        stale_after,
    );
    let result = monitor
        .run_with_signal(async move {
            tokio::select! {
                _ = shutdown => {
                    tracing::info!("shutdown requested: finishing in-flight jobs");
                    requested_signal.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                (queue, workers) = silent => tracing::error!(
                    queue,
                    workers,
                    silent_for_s = stale_after.as_secs(),
                    "a job worker stopped heartbeating without an error; stopping the process so that its supervisor starts it again"
                ),
            }
            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = stop_signal.send(true);
            Ok(())
        })
        .await;
    // The monitor may also return on its own (every worker ended): stop the
    // projectors and the sweeper either way, and say so, so that the process
    // exits and its supervisor starts it again instead of it idling.
    let _ = stop_tx.send(true);
    for h in background {
        let _ = h.await;
    }
    queue_pool.close().await;
    tracing::info!("worker stopped");
    result.map_err(|e| anyhow::anyhow!("worker monitor: {e}"))?;
    anyhow::ensure!(
        requested.load(std::sync::atomic::Ordering::SeqCst),
        "the job workers stopped without a shutdown request"
    );
    Ok(())
}

/// Every job queue a `slate work` process serves.
pub const QUEUES: &[&str] = &[
    diagnostics::QUEUE,
    stripe::QUEUE,
    generations::QUEUE,
    sweeper::QUEUE,
    webhooks::QUEUE,
    email::QUEUE,
    purge::QUEUE,
    renewal::QUEUE,
];

/// Resolves with a queue whose worker in this process has not heartbeated
/// for `stale_after` while the database answers, or one of whose workers
/// (by name: the generation queue has several) has not. An apalis worker was seen
/// (in the chaos soak, docs/CHAOS.md) going silent without an error: no
/// heartbeat, no fetch, for ever, so its queue lost this process's capacity
/// until the process was restarted. Checked every `every`; a database that
/// does not answer is not a silent worker (the outage path restarts those).
/// The names of failed workers kept alive for their running jobs
/// (`crate::in_flight`) do not count as the queue's worker, and nothing is
/// judged until the database has answered for a while. Also resolves
/// with what the queue's rows of this process say (see [`queue_workers`]).
async fn watchdog(
    pool: PgPool,
    process: String,
    in_flight: InFlight,
    every: Duration,
    stale_after: Duration,
) -> (String, String) {
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when the database has answered every look. After an outage
    // every worker's last beat is old (older than `stale_after` when the
    // outage was longer), and the failed workers register again only a
    // moment after the database is back (a failed registration waits 1 s,
    // `crate::queue`): a look in that moment would take them for silent
    // and stop the process. (The likely cause of the watchdog stops seen
    // just after PostgreSQL restarts in the twentieth session's soaks, one
    // after a 55 s restart; not shown.)
    let settle = (stale_after / 10).max(Duration::from_secs(10));
    let mut answering: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        if started.elapsed() < stale_after {
            continue;
        }
        let silent = silent_queue(&pool, &process, stale_after, &in_flight.retired()).await;
        match silent {
            Err(_) => answering = None,
            Ok(queue) => {
                let since = *answering.get_or_insert_with(tokio::time::Instant::now);
                if let Some(queue) = queue
                    && since.elapsed() >= settle
                {
                    let workers = queue_workers(&pool, &process, &queue, &in_flight).await;
                    return (queue, workers);
                }
            }
        }
    }
}

/// A queue of `process` none of whose workers has heartbeated for
/// `stale_after`, or one worker of which (by its name, a restart's `.rN`
/// counting as the same) has not while its siblings of the same queue go
/// on: one of the generation fetchers falling silent is the same loss of
/// capacity, and a look by queue alone let the soak find it only at its
/// end. `retired` names (failed workers kept alive for their jobs) count for
/// nothing.
pub async fn silent_queue(
    pool: &PgPool,
    process: &str,
    stale_after: Duration,
    retired: &[String],
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "select q from unnest($2::text[]) as t(q)
          where not exists (select 1 from apalis.workers w
                             where w.worker_type = t.q and starts_with(w.id, $1 || '.')
                               and w.id <> all($4)
                               and w.last_seen > now() - make_interval(secs => $3))
         union all
         select w.worker_type from apalis.workers w
          where starts_with(w.id, $1 || '.') and w.id <> all($4)
          group by w.worker_type, regexp_replace(w.id, '[.]r[0-9]+$', '')
         having not bool_or(w.last_seen > now() - make_interval(secs => $3))
          limit 1",
    )
    .bind(process)
    .bind(QUEUES)
    .bind(stale_after.as_secs_f64())
    .bind(retired)
    .fetch_optional(pool)
    .await
}

/// This process's rows of `queue` in `apalis.workers`, newest beat first:
/// each name, how long ago it last beat and registered, and whether it is a
/// failed worker's name kept alive for its jobs. For the watchdog's line,
/// so that a silent worker says which one it was.
async fn queue_workers(pool: &PgPool, process: &str, queue: &str, in_flight: &InFlight) -> String {
    let retired = in_flight.retired();
    let rows: Result<Vec<(String, f64, Option<f64>)>, sqlx::Error> = sqlx::query_as(
        "select id, extract(epoch from now() - last_seen)::float8,
                extract(epoch from now() - started_at)::float8
           from apalis.workers
          where worker_type = $1 and starts_with(id, $2 || '.')
          order by last_seen desc
          limit 12",
    )
    .bind(queue)
    .bind(process)
    .fetch_all(pool)
    .await;
    match rows {
        Err(e) => format!("(not read: {e})"),
        Ok(rows) if rows.is_empty() => "(none registered)".to_owned(),
        Ok(rows) => rows
            .iter()
            .map(|(id, seen, started)| {
                format!(
                    "{id}: beat {seen:.1} s ago, registered {} ago{}",
                    started.map_or("?".to_owned(), |s| format!("{s:.1} s")),
                    if retired.contains(id) {
                        ", retired"
                    } else {
                        ""
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Workers for the generation queue by default.
pub const GENERATION_FETCHERS: usize = 4;

/// Generations one `slate work` runs at once by default
/// (`SLATE_GENERATION_CONCURRENCY`).
pub const GENERATION_CONCURRENCY: usize = 8;

/// A provider's result's size cap.
pub const RESULT_LIMIT: usize = 512 << 20;

/// The memory results in flight may hold together, by default
/// (`SLATE_RESULT_MEMORY_MB`; see [`generations::Downloads`]).
pub const RESULT_MEMORY: usize = 1024 << 20;

/// Completion webhooks one `slate work` delivers at once by default
/// (`SLATE_WEBHOOK_CONCURRENCY`).
pub const WEBHOOK_CONCURRENCY: usize = 8;

/// Stripe events one `slate work` processes at once by default
/// (`SLATE_STRIPE_CONCURRENCY`). Without a limit an
/// apalis worker runs every job it fetches at once, and fetches again at
/// once: behind a burst of deliveries (10,000 in the bench's part 7) it
/// held about 7,800 jobs running at once, waiting on the pool's 20
/// connections, at 534 MiB of memory, and the ones that waited past the
/// pool's 5 s were retried later instead of processed.
pub const STRIPE_CONCURRENCY: usize = 8;

/// Emails one `slate work` sends at once by default
/// (`SLATE_EMAIL_CONCURRENCY`; each an HTTP call to the email API): a burst
/// of them was as many calls at once, unlimited like the Stripe events
/// above.
pub const EMAIL_CONCURRENCY: usize = 8;

/// Account purges one `slate work` runs at once by default
/// (`SLATE_PURGE_CONCURRENCY`). A purge holds a connection
/// for its whole run (its lock's transaction) and asks the pool for more,
/// and the sweep queues every due purge at once: unlimited, about 20 of
/// them would hold the pool's 20 connections, each waiting for a second.
pub const PURGE_CONCURRENCY: usize = 2;

/// Diagnostic jobs (`slate jobs ping`) one `slate work` runs at once: they
/// finish at once, and unlimited a flood of them would be as many tasks.
const DIAGNOSTICS_CONCURRENCY: usize = 4;

/// `concurrency` jobs at once across up to `fetchers` workers of one queue:
/// how many jobs each worker runs at once (as even as can be, `concurrency`
/// in all).
///
/// apalis-core runs a worker's fetches, lock and completion updates and
/// heartbeats one after another, each its own transaction; several workers
/// fetch side by side, each taking as many jobs as it has free slots (see
/// [`crate::queue`]).
pub fn split_concurrency(concurrency: usize, fetchers: usize) -> Vec<usize> {
    let concurrency = concurrency.max(1);
    let workers = fetchers.clamp(1, concurrency);
    (0..workers)
        .map(|i| concurrency / workers + usize::from(i < concurrency % workers))
        .collect()
}

/// What each queue's worker factory needs of the process.
#[derive(Clone)]
struct Instances {
    process: String,
    in_flight: InFlight,
}

impl Instances {
    /// The name of one queue's worker in this process, new at each
    /// restart: a restarted worker must not inherit the jobs its failed
    /// predecessor had locked (they return to the queue once that name
    /// stops heartbeating, like a dead process's, which it does once the
    /// last of them that still runs here has ended: `crate::in_flight`).
    fn name(&self, queue: &str, restarts: usize) -> String {
        if restarts == 0 {
            format!("{}.{queue}", self.process)
        } else {
            format!("{}.{queue}.r{restarts}", self.process)
        }
    }

    /// Counts a worker's running jobs by its name.
    fn counted(&self) -> InFlightLayer {
        self.in_flight.layer()
    }
}

/// The storage of `queue` as this process's workers take it.
fn storage<T>(
    wakeups: &crate::poll::Wakeups,
    queue_pool: &PgPool,
    settings: &WorkerSettings,
    in_flight: &InFlight,
    queue: &str,
) -> crate::poll::Backend<T> {
    let mut storage =
        crate::poll::backend::<T>(wakeups, queue_pool, queue, settings.queue_config(queue));
    storage.keep_alive(in_flight);
    storage
}

async fn sweep_loop(pool: PgPool, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = stop.changed() => if changed.is_err() { return },
        }
        if *stop.borrow() {
            return;
        }
        let slot = chrono::Utc::now().timestamp() / every.as_secs().max(1) as i64;
        if let Err(e) = sweeper::schedule(&pool, slot).await {
            tracing::error!(error = %e, "scheduling the maintenance sweep failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_concurrency;

    #[test]
    fn the_split_keeps_the_total() {
        assert_eq!(split_concurrency(8, 4), vec![2, 2, 2, 2]);
        assert_eq!(split_concurrency(7, 4), vec![2, 2, 2, 1]);
        assert_eq!(split_concurrency(2, 4), vec![1, 1]);
        assert_eq!(split_concurrency(0, 0), vec![1]);
        for c in 1..40 {
            for f in 1..10 {
                let s = split_concurrency(c, f);
                assert_eq!(s.iter().sum::<usize>(), c);
                assert!(s.iter().all(|&n| n >= 1));
            }
        }
    }
}
