//! The `slate` command line: every process and operator tool.

use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use slate_events::catalog::GrantSource;
use slate_events::credits::{self, Grant};
use slate_events::projections::{self, Projection};
use slate_events::{Actor, Metadata};
use uuid::Uuid;

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "slate",
    version,
    about = "Slate: credits, generations and the audit log"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if missing and run all migrations.
    Migrate,
    /// Serve the HTTP API.
    Serve,
    /// Run the job workers, the projectors and the sweeper.
    Work,
    /// Rebuild or verify projections.
    Projections {
        #[command(subcommand)]
        command: ProjectionsCommand,
    },
    /// The event catalog.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Write the OpenAPI 3.1 document of the HTTP API (what `GET
    /// /openapi.json` serves).
    Openapi {
        #[arg(long, default_value = "docs/openapi.json")]
        out: PathBuf,
        /// Only check that the file is up to date (exit 1 when stale).
        #[arg(long)]
        check: bool,
    },
    /// Accounts.
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// The credit ledger.
    Credits {
        #[command(subcommand)]
        command: CreditsCommand,
    },
    /// The audit log, for staff at the command line.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The affiliate programme.
    Affiliates {
        #[command(subcommand)]
        command: AffiliatesCommand,
    },
    /// Stripe events: replay processing from the mirror.
    Stripe {
        #[command(subcommand)]
        command: StripeCommand,
    },
    /// Job queue diagnostics.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Run the ledger's story against the configured services; `demo story`
    /// runs the whole service's story against a running serve + work.
    Demo {
        #[command(subcommand)]
        command: Option<DemoCommand>,
    },
    /// Measure throughput and latency against the real services (build with
    /// --release for figures worth quoting).
    Bench {
        /// Short runs (under a minute).
        #[arg(long)]
        quick: bool,
        /// Seconds per throughput measurement.
        #[arg(long)]
        seconds: Option<f64>,
        /// Webhook deliveries to send.
        #[arg(long)]
        webhooks: Option<usize>,
        /// Concurrent webhook senders.
        #[arg(long)]
        senders: Option<usize>,
        /// Jobs for the queue measurements (and the pickup backlog).
        #[arg(long)]
        jobs: Option<usize>,
        /// Events the rebuild measurement adds to the log.
        #[arg(long)]
        rebuild_events: Option<usize>,
        /// Events in the log for the second append-latency measurement.
        #[arg(long)]
        log_events: Option<usize>,
        /// Audit entries for the staff-query measurement.
        #[arg(long)]
        audit_entries: Option<usize>,
        /// Samples per latency figure.
        #[arg(long)]
        samples: Option<usize>,
        /// Jobs, and generations, timed one by one for the pickup latency
        /// (part 9).
        #[arg(long)]
        pickup_samples: Option<usize>,
        /// Scrapes timed before and after the fold (part 10).
        #[arg(long)]
        scrape_samples: Option<usize>,
        /// Purges timed before the mirror's ids are written (part 11; each
        /// reads the mirror whole).
        #[arg(long)]
        purge_samples: Option<usize>,
        /// Processed Stripe events in the mirror for the scrape measurement
        /// (part 10).
        #[arg(long)]
        stripe_events: Option<usize>,
        /// Credit buckets of other accounts among which part 12 reads
        /// balances.
        #[arg(long)]
        credit_buckets: Option<usize>,
        /// Done jobs in the queue's table for the scrape measurement
        /// (part 10).
        #[arg(long)]
        finished_jobs: Option<usize>,
        /// Finished generations in their table for the scrape measurement
        /// (part 10).
        #[arg(long)]
        finished_generations: Option<usize>,
        /// Workers sharing the generation queue's concurrency of 8 in part 4
        /// (`slate work`'s default: 4).
        #[arg(long)]
        generation_fetchers: Option<usize>,
        /// The generation queue's concurrency in part 4 (`slate work`'s
        /// default: 8).
        #[arg(long)]
        generation_concurrency: Option<usize>,
        /// Clients submitting generations in part 4, each for its own
        /// account (default 16).
        #[arg(long)]
        generation_clients: Option<usize>,
        /// Writer tasks of the group commit in part 2b (the server's
        /// default: 2).
        #[arg(long)]
        group_writers: Option<usize>,
        /// Run only this part: "appends" (parts 1, 2 and 2b: the ceiling
        /// and the appends), "rebuild" (part 5, the projection rebuild),
        /// "webhooks" (part 3, with the ceiling at 32 connections it is
        /// compared with), "jobs" (part 4), "audit" (part 8, over audit
        /// entries that are all the fill's), "scrape" (part 10), "purge"
        /// (part 11, over a mirror of its own) or "auth" (part 12).
        #[arg(long, value_parser = ["appends", "rebuild", "webhooks", "jobs", "audit", "scrape", "purge", "auth"])]
        only: Option<String>,
    },
    /// The multi-process soak with faults (run through `scripts/chaos`).
    #[command(hide = true)]
    Chaos {
        #[command(subcommand)]
        command: ChaosCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ChaosCommand {
    /// Start the serve and work processes against the configured services,
    /// drive the load, inject the faults, check the invariants.
    Drive {
        #[arg(long, value_enum, default_value = "ci")]
        mode: crate::chaos::Mode,
        /// The soak's state directory (logs, pid files).
        #[arg(long)]
        state: PathBuf,
        /// `account_id<TAB>api_key` lines.
        #[arg(long)]
        accounts: PathBuf,
        /// A command taking `<pg|redis|s3> <start|stop>`.
        #[arg(long)]
        control: String,
        /// Comma-separated ports of the serve processes.
        #[arg(long, value_delimiter = ',', default_value = "28081,28082")]
        serve_ports: Vec<u16>,
        /// The fake provider's port.
        #[arg(long, default_value = "28090")]
        provider_port: u16,
        #[arg(long)]
        seed: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DemoCommand {
    /// Buy credits through a signed webhook and run three generations
    /// through a running `slate serve` and `slate work`.
    Story {
        /// The running `slate serve`.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Replay the log from zero into the live tables.
    Rebuild {
        /// One projection (credits, credit_ledger); all when omitted.
        #[arg(long)]
        projection: Option<String>,
    },
    /// Rebuild into scratch tables and compare with the live ones; exits 1 on
    /// any difference.
    Verify {
        #[arg(long)]
        projection: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Write the catalog as JSON Schema files.
    Schema {
        #[arg(long, default_value = "events/schema")]
        out: PathBuf,
        /// Only check that the files are up to date (exit 1 when stale).
        #[arg(long)]
        check: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Set up the second factor (TOTP) of a staff account; prints the
    /// otpauth URI once (it carries the secret).
    TotpEnroll {
        #[arg(long)]
        account: Uuid,
    },
    /// Open an account; prints its id, and its first API key alone on the
    /// last line.
    Create {
        #[arg(long)]
        email: String,
        #[arg(long)]
        staff: bool,
        /// An affiliate's referral code.
        #[arg(long)]
        referral_code: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Grant credits (support goodwill, promotions).
    Grant {
        #[arg(long)]
        account: Uuid,
        #[arg(long)]
        amount: i64,
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "goodwill")]
        source: GrantSource,
        /// RFC 3339 time after which the credits lapse.
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
        /// Idempotency key; a new one when omitted.
        #[arg(long)]
        key: Option<String>,
    },
    /// Available, reserved, debt and buckets of an account.
    Show {
        #[arg(long)]
        account: Uuid,
    },
    /// Release holds past their expiry and lapse expired buckets now.
    Sweep,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Entries matching the filters, newest first.
    Query {
        #[arg(long)]
        account: Option<Uuid>,
        #[arg(long)]
        actor: Option<String>,
        /// An action (`generation.failed`) or a family (`generation`).
        #[arg(long)]
        action: Option<String>,
        /// Any target value (generation, Stripe event or object, key…).
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long)]
        outcome: Option<String>,
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        #[arg(long)]
        to: Option<DateTime<Utc>>,
        #[arg(long, default_value = "50")]
        limit: i64,
    },
    /// A range as JSON Lines or CSV, oldest first.
    Export {
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        #[arg(long)]
        to: Option<DateTime<Utc>>,
        #[arg(long)]
        account: Option<Uuid>,
        /// jsonl or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AffiliatesCommand {
    /// Register an affiliate with a referral code and a commission rate.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        code: String,
        /// Commission in basis points (1000 = 10 %).
        #[arg(long)]
        rate_bps: i32,
    },
    /// Attribute an account to the affiliate owning a referral code.
    Refer {
        #[arg(long)]
        account: Uuid,
        #[arg(long)]
        code: String,
    },
    /// What is owed to each affiliate (earned − clawed back − paid).
    Owed,
    /// Record a payout made to an affiliate (idempotent per reference).
    RecordPayout {
        #[arg(long)]
        affiliate: Uuid,
        /// Minor units (cents).
        #[arg(long)]
        amount: i64,
        #[arg(long, default_value = "usd")]
        currency: String,
        /// The transfer's reference (bank or payout id).
        #[arg(long)]
        reference: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum StripeCommand {
    /// Re-run processing of mirrored events (all of them unless filtered).
    /// Safe to run any number of times: effects are keyed per Stripe object.
    Replay {
        /// One event, by Stripe id (evt_…).
        #[arg(long)]
        id: Option<String>,
        /// Events of one type (e.g. invoice.paid).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Events Stripe created at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<DateTime<Utc>>,
        /// Only events whose processing failed.
        #[arg(long)]
        failed: bool,
        /// Only events not processed yet.
        #[arg(long)]
        pending: bool,
    },
    /// Ingest events from Stripe's Events API that the webhook never
    /// delivered (Stripe keeps events for 30 days).
    Reconcile {
        /// RFC 3339 time: events Stripe created at or after it.
        #[arg(long)]
        since: DateTime<Utc>,
        /// Only list what is missing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Enqueue a diagnostic job for `slate work` to run.
    Ping {
        /// A job that panics, to check the worker survives it.
        #[arg(long)]
        panic: bool,
    },
}

fn operator() -> Metadata {
    let name = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    Metadata::by(Actor::Operator { name })
}

fn selected(name: &Option<String>) -> anyhow::Result<Vec<Projection>> {
    match name {
        None => Ok(Projection::ALL.to_vec()),
        Some(n) => Projection::from_name(n)
            .map(|p| vec![p])
            .with_context(|| format!("unknown projection {n:?} (credits, credit_ledger)")),
    }
}

/// Run a command; returns the process exit code.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<i32> {
    // Data keys of personal fields are wrapped with the server key.
    slate_events::vault::install(config.sealing_key.clone());
    let db_url = config.database_url.expose().to_owned();
    let pool = || async {
        slate_events::db::connect(&db_url, config.database_max_connections)
            .await
            .context("connecting to PostgreSQL")
    };
    match cli.command {
        Command::Migrate => {
            crate::migrate::ensure_database(&db_url).await?;
            crate::migrate::run(&pool().await?).await?;
            println!("migrations applied");
        }
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("binding {}", config.listen))?;
            let state = crate::server::build_state(config).await?;
            crate::server::serve(listener, state, crate::shutdown_signal()).await?;
        }
        Command::Work => {
            let name = format!(
                "{}-{}-{}",
                hostname(),
                std::process::id(),
                &Uuid::new_v4().simple().to_string()[..8]
            );
            let mut settings = slate_workers::WorkerSettings::new(name, config.storage());
            settings.providers = std::sync::Arc::new(
                slate_workers::providers::Providers::new(&config.providers)
                    .context("provider settings")?,
            );
            settings.generation_attempts = config.generation_attempts;
            settings.generation_concurrency = config.generation_concurrency;
            settings.generation_fetchers = config.generation_fetchers;
            settings.stripe_concurrency = config.stripe_concurrency;
            settings.webhook_concurrency = config.webhook_concurrency;
            settings.email_concurrency = config.email_concurrency;
            settings.purge_concurrency = config.purge_concurrency;
            // Each Stripe event holds a connection while it runs, each purge
            // one and at times a second: more than the pool has would leave
            // them waiting on its timeout and retried (the projectors, the
            // sweep and the other queues need connections too).
            let held = config.stripe_concurrency + 2 * config.purge_concurrency;
            if held >= config.database_max_connections as usize {
                tracing::warn!(
                    stripe = config.stripe_concurrency,
                    purge = config.purge_concurrency,
                    pool = config.database_max_connections,
                    "SLATE_STRIPE_CONCURRENCY + 2 × SLATE_PURGE_CONCURRENCY is not below DATABASE_MAX_CONNECTIONS: jobs will wait for connections"
                );
            }
            settings.downloads = slate_workers::generations::Downloads::new(
                slate_workers::runtime::RESULT_LIMIT,
                config.result_memory,
            );
            settings.poll_interval = config.provider_poll;
            settings.webhook_allow = config.webhook_allowlist.clone();
            settings.media_allow = config.media_allowlist.clone();
            settings.stripe_refetch = config
                .stripe_client()?
                .map(crate::stripe::reconcile::refetcher);
            settings.stripe_cancel = config
                .stripe_client()?
                .map(crate::stripe::billing::subscription_canceller);
            settings.stripe_renewal = config
                .stripe_client()?
                .map(crate::stripe::billing::subscription_renewal);
            settings.mailer = config
                .email
                .clone()
                .map(slate_workers::email::Mailer::new)
                .transpose()?;
            settings.stripe_catalog = config.stripe_catalog.clone();
            settings.heartbeat = config.worker_heartbeat;
            settings.missed_heartbeats = config.worker_missed_heartbeats;
            settings.sweep_interval = config.sweep_interval;
            settings.job_retention = config.job_retention;
            settings.fault_stripe_hold = config.fault_stripe_hold;
            // Started during an outage: wait for PostgreSQL rather than
            // exit (a stop request while waiting ends it cleanly).
            let shutdown = futures::FutureExt::shared(Box::pin(crate::shutdown_signal()));
            let Some(pool) = slate_events::db::connect_waiting(
                &db_url,
                config.database_max_connections,
                shutdown.clone(),
            )
            .await
            .context("connecting to PostgreSQL")?
            else {
                tracing::info!("stop requested while waiting for PostgreSQL");
                return Ok(0);
            };
            slate_workers::run(pool, settings, shutdown).await?;
        }
        Command::Projections { command } => match command {
            ProjectionsCommand::Rebuild { projection } => {
                let pool = pool().await?;
                for p in selected(&projection)? {
                    let n = projections::rebuild(&pool, p).await?;
                    println!("{}: rebuilt from {n} events", p.name());
                }
            }
            ProjectionsCommand::Verify { projection } => {
                let pool = pool().await?;
                let report = projections::verify(&pool, &selected(&projection)?).await?;
                for t in &report.tables {
                    let state = if t.is_clean() { "ok" } else { "DIFFERENT" };
                    println!(
                        "{:<14} {:<26} live {:>8}  rebuilt {:>8}  {state}",
                        t.projection, t.table, t.live_rows, t.rebuilt_rows
                    );
                    for s in &t.samples {
                        println!("    {s}");
                    }
                }
                println!("{} events replayed", report.events_replayed);
                if !report.is_clean() {
                    println!("projections differ from the log");
                    return Ok(1);
                }
                println!("all projections match the log");
            }
        },
        Command::Events { command } => match command {
            EventsCommand::Schema { out, check } => return schema(&out, check),
        },
        Command::Openapi { out, check } => return openapi(&out, check),
        Command::Accounts { command } => match command {
            AccountsCommand::TotpEnroll { account } => {
                let pool = pool().await?;
                let mut conn = pool.acquire().await?;
                let a = slate_events::accounts::get_account(&mut conn, account)
                    .await?
                    .context("no such account")?;
                let uri = slate_events::mfa::enroll(
                    &mut conn,
                    account,
                    a.email.as_deref().context("the account is purged")?,
                    &config.sealing_key,
                    operator(),
                )
                .await?;
                println!("scan this once into an authenticator app (it is not shown again):");
                println!("{uri}");
            }
            AccountsCommand::Create {
                email,
                staff,
                referral_code,
            } => {
                let pool = pool().await?;
                // All or nothing: a wrong referral code left an account
                // without its key (and its email taken for a second try).
                let mut tx = pool.begin().await?;
                let id = slate_events::accounts::create_account(&mut tx, &email, staff, operator())
                    .await?;
                if let Some(code) = referral_code {
                    slate_events::affiliates::refer(&mut tx, id, &code, operator()).await?;
                }
                let key =
                    slate_events::access::create_key(&mut tx, id, Some("first key"), operator())
                        .await?;
                tx.commit().await?;
                println!("account {id}");
                println!("API key (shown once; only its hash is stored):");
                println!("{}", key.plaintext);
            }
        },
        Command::Credits { command } => match command {
            CreditsCommand::Grant {
                account,
                amount,
                reason,
                source,
                expires_at,
                key,
            } => {
                let pool = pool().await?;
                let mut conn = pool.acquire().await?;
                let grant = Grant {
                    account_id: account,
                    amount,
                    source,
                    grant_key: key.unwrap_or_else(|| format!("operator:{}", Uuid::now_v7())),
                    stripe_object: None,
                    expires_at,
                    reason: Some(reason),
                };
                let out = credits::grant(&mut conn, &grant, &operator()).await?;
                // The key makes a re-run safe: a connection lost after the
                // commit is retried with `--key` and grants nothing twice.
                println!(
                    "{}: {} credits into bucket {} ({} settled debt; key {})",
                    out.outcome, out.amount, out.bucket_id, out.debt_settled, grant.grant_key
                );
            }
            CreditsCommand::Show { account } => {
                let pool = pool().await?;
                let mut conn = pool.acquire().await?;
                let b = credits::balance(&mut conn, account).await?;
                println!("{}", serde_json::to_string_pretty(&b)?);
            }
            CreditsCommand::Sweep => {
                let r = slate_workers::sweeper::sweep_with(
                    &pool().await?,
                    Utc::now(),
                    config.job_retention,
                )
                .await?;
                println!(
                    "{} holds released, {} buckets expired",
                    r.holds_released, r.buckets_expired
                );
            }
        },
        Command::Audit { command } => {
            let pool = pool().await?;
            return audit(&pool, command).await;
        }
        Command::Affiliates { command } => {
            let pool = pool().await?;
            let mut conn = pool.acquire().await?;
            match command {
                AffiliatesCommand::Create {
                    name,
                    code,
                    rate_bps,
                } => {
                    let id = slate_events::affiliates::create_affiliate(
                        &mut conn,
                        &name,
                        &code,
                        rate_bps,
                        operator(),
                    )
                    .await?;
                    println!("affiliate {id} ({name}, code {code}, {rate_bps} bps)");
                }
                AffiliatesCommand::Refer { account, code } => {
                    let a = slate_events::affiliates::refer(&mut conn, account, &code, operator())
                        .await?;
                    println!("account {account} referred by affiliate {a}");
                }
                AffiliatesCommand::Owed => {
                    let rows = slate_events::affiliates::owed(&mut conn).await?;
                    println!(
                        "{:<38} {:<20} {:<4} {:>10} {:>10} {:>10} {:>10}",
                        "affiliate", "name", "cur", "earned", "clawback", "paid", "owed"
                    );
                    for o in rows {
                        println!(
                            "{:<38} {:<20} {:<4} {:>10} {:>10} {:>10} {:>10}",
                            o.affiliate_id,
                            o.name,
                            o.currency,
                            o.earned,
                            o.clawed_back,
                            o.paid,
                            o.owed
                        );
                    }
                }
                AffiliatesCommand::RecordPayout {
                    affiliate,
                    amount,
                    currency,
                    reference,
                } => {
                    let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
                    let payout = slate_events::affiliates::record_payout(
                        &mut tx,
                        affiliate,
                        &currency,
                        amount,
                        &reference,
                        operator(),
                    )
                    .await?;
                    tx.commit().await?;
                    let left = payout.owed;
                    if payout.recorded {
                        tracing::info!(%affiliate, amount, %currency, %reference, "affiliate payout recorded");
                        println!("payout {reference} recorded; {left} {currency} still owed");
                    } else {
                        println!(
                            "payout {reference} was recorded already; {left} {currency} still owed"
                        );
                    }
                }
            }
        }
        Command::Stripe { command } => match command {
            StripeCommand::Replay {
                id,
                event_type,
                since,
                failed,
                pending,
            } => {
                let pool = pool().await?;
                let filter = slate_events::stripe::ReplayFilter {
                    id,
                    event_type,
                    since,
                    failed_only: failed,
                    pending_only: pending,
                };
                return replay(&pool, &config, &filter).await;
            }
            StripeCommand::Reconcile { since, dry_run } => {
                let pool = pool().await?;
                let client = config.stripe_client()?;
                let now = Utc::now();
                let s = crate::stripe::reconcile::reconcile(
                    &pool,
                    client.as_ref(),
                    config.livemode,
                    since,
                    dry_run,
                    now,
                )
                .await?;
                if s.beyond_retention {
                    println!(
                        "note: Stripe keeps events for {} days; anything older than {} cannot be reconciled",
                        crate::stripe::reconcile::RETENTION_DAYS,
                        (now - chrono::Duration::days(crate::stripe::reconcile::RETENTION_DAYS))
                            .format("%Y-%m-%d %H:%M UTC")
                    );
                }
                println!(
                    "listed {} event(s) since {}: {} already mirrored, {} missing{}",
                    s.listed,
                    since.to_rfc3339(),
                    s.already_mirrored,
                    s.missing_by_type.values().sum::<usize>(),
                    if dry_run {
                        " (dry run: nothing ingested)".to_owned()
                    } else {
                        format!(", {} ingested", s.ingested)
                    }
                );
                for (t, n) in &s.missing_by_type {
                    println!("  {n:>5}  {t}");
                }
                if s.unreadable > 0 {
                    println!(
                        "  {} listed item(s) were not Stripe events and were skipped",
                        s.unreadable
                    );
                }
                if s.other_mode > 0 {
                    println!(
                        "  {} event(s) of {} mode were skipped: is STRIPE_API_KEY of this deployment's mode (SLATE_LIVEMODE={})?",
                        s.other_mode,
                        if config.livemode { "test" } else { "live" },
                        config.livemode
                    );
                }
                if s.other_account > 0 {
                    println!(
                        "  {} connected account event(s) were skipped",
                        s.other_account
                    );
                }
            }
        },
        Command::Jobs { command } => match command {
            JobsCommand::Ping { panic } => {
                let pool = pool().await?;
                let mut conn = pool.acquire().await?;
                let job = if panic {
                    slate_workers::diagnostics::DiagnosticJob::Panic
                } else {
                    slate_workers::diagnostics::DiagnosticJob::Ping
                };
                // Outside a transaction: committed when it returns.
                slate_workers::jobs::enqueue(&mut conn, slate_workers::diagnostics::QUEUE, &job, 1)
                    .await?
                    .send(&pool)
                    .await;
                println!("enqueued {job:?}");
            }
        },
        Command::Bench {
            quick,
            seconds,
            webhooks,
            senders,
            jobs,
            rebuild_events,
            log_events,
            audit_entries,
            samples,
            pickup_samples,
            scrape_samples,
            purge_samples,
            stripe_events,
            credit_buckets,
            finished_jobs,
            finished_generations,
            generation_fetchers,
            generation_concurrency,
            generation_clients,
            group_writers,
            only,
        } => {
            let mut opts = if quick {
                crate::bench::BenchOptions::quick()
            } else {
                crate::bench::BenchOptions::default()
            };
            opts.seconds = seconds.unwrap_or(opts.seconds);
            // A negative time panicked (`Duration::from_secs_f64`), and 0
            // printed ratios of nothing to nothing.
            anyhow::ensure!(
                opts.seconds.is_finite() && opts.seconds > 0.0,
                "--seconds must be a positive number"
            );
            opts.webhooks = webhooks.unwrap_or(opts.webhooks);
            opts.senders = senders.unwrap_or(opts.senders).max(1);
            opts.jobs = jobs.unwrap_or(opts.jobs).max(1);
            opts.generation_fetchers = generation_fetchers
                .unwrap_or(opts.generation_fetchers)
                .max(1);
            opts.generation_concurrency = generation_concurrency
                .unwrap_or(opts.generation_concurrency)
                .max(1);
            opts.generation_clients = generation_clients.unwrap_or(opts.generation_clients).max(1);
            opts.group_writers = group_writers.unwrap_or(opts.group_writers).max(1);
            let s = &mut opts.scale;
            s.rebuild_events = rebuild_events.unwrap_or(s.rebuild_events);
            s.log_events = log_events.unwrap_or(s.log_events);
            s.audit_entries = audit_entries.unwrap_or(s.audit_entries);
            s.samples = samples.unwrap_or(s.samples).max(1);
            s.pickup_samples = pickup_samples.unwrap_or(s.pickup_samples).max(1);
            s.scrape_samples = scrape_samples.unwrap_or(s.scrape_samples).max(1);
            s.purge_scan_samples = purge_samples.unwrap_or(s.purge_scan_samples).max(1);
            s.stripe_events = stripe_events.unwrap_or(s.stripe_events);
            s.credit_buckets = credit_buckets.unwrap_or(s.credit_buckets);
            s.finished_jobs = finished_jobs.unwrap_or(s.finished_jobs);
            s.finished_generations = finished_generations.unwrap_or(s.finished_generations);
            match only.as_deref() {
                Some("appends") => {
                    crate::bench::print_appends(&crate::bench::run_appends(&config, &opts).await?)
                }
                Some("rebuild") => {
                    crate::bench::print_rebuild(&crate::bench::run_rebuild(&config, &opts).await?)
                }
                Some("webhooks") => {
                    crate::bench::print_webhooks(&crate::bench::run_webhooks(&config, &opts).await?)
                }
                Some("jobs") => {
                    crate::bench::print_jobs(&crate::bench::run_jobs(&config, &opts).await?)
                }
                Some("audit") => {
                    let (fill, queries) = crate::bench::run_audit(&config, &opts).await?;
                    crate::bench::print_audit(&fill, &queries);
                    println!(
                        "{}",
                        serde_json::json!({ "audit_entries": fill, "audit_queries": queries })
                    );
                }
                Some("scrape") => {
                    crate::bench::print_scrape(&crate::bench::run_scrape(&config, &opts).await?)
                }
                Some("auth") => {
                    let auth = crate::bench::run_auth(&config, &opts).await?;
                    crate::bench_auth::print(&auth);
                    println!("{}", serde_json::to_string(&auth).unwrap_or_default());
                }
                Some("purge") => {
                    let purge = crate::bench::run_purge(&config, &opts).await?;
                    crate::bench::print_purge(&purge);
                    println!("{}", serde_json::to_string(&purge).unwrap_or_default());
                }
                _ => crate::bench::print(&crate::bench::run(&config, &opts).await?),
            }
        }
        Command::Chaos {
            command:
                ChaosCommand::Drive {
                    mode,
                    state,
                    accounts,
                    control,
                    serve_ports,
                    provider_port,
                    seed,
                },
        } => {
            let opts = crate::chaos::DriveOptions {
                mode,
                state,
                accounts,
                control,
                serve_ports,
                provider_port,
                seed,
            };
            return crate::chaos::drive(&config, opts).await;
        }
        Command::Demo { command } => {
            crate::migrate::ensure_database(&db_url).await?;
            let pool = pool().await?;
            crate::migrate::run(&pool).await?;
            return match command {
                None => crate::demo::run(&pool, &config).await,
                Some(DemoCommand::Story { url }) => {
                    let secret = config
                        .stripe_webhook_secrets
                        .first()
                        .context("the story signs a webhook: set STRIPE_WEBHOOK_SECRETS")?;
                    crate::demo_story::run(
                        &pool,
                        &config,
                        url.trim_end_matches('/'),
                        secret.expose(),
                    )
                    .await
                }
            };
        }
    }
    Ok(0)
}

async fn audit(pool: &sqlx::PgPool, command: AuditCommand) -> anyhow::Result<i32> {
    use std::io::Write;
    match command {
        AuditCommand::Query {
            account,
            actor,
            action,
            target,
            request_id,
            outcome,
            from,
            to,
            limit,
        } => {
            let f = crate::audit::Filter {
                account,
                actor,
                action,
                target,
                from,
                to,
                request_id,
                outcome,
                ..Default::default()
            };
            let rows = crate::audit::query(
                pool,
                &f,
                limit.clamp(1, 10_000),
                false,
                crate::audit::Shows::NoOrigin,
            )
            .await?;
            for e in &rows {
                println!(
                    "{:>8}  {}  {:<8} {:<36}  {:<30} {:<8} {}{}",
                    e.seq,
                    e.at.format("%Y-%m-%d %H:%M:%S"),
                    e.actor_kind,
                    e.actor_id.as_deref().unwrap_or("-"),
                    e.action,
                    e.outcome,
                    e.targets,
                    e.reason
                        .as_deref()
                        .map(|r| format!("  ({r})"))
                        .unwrap_or_default()
                );
            }
            println!("{} entries", rows.len());
        }
        AuditCommand::Export {
            from,
            to,
            account,
            format,
            out,
        } => {
            let csv = match format.as_str() {
                "jsonl" => false,
                "csv" => true,
                other => anyhow::bail!("format is jsonl or csv, not {other}"),
            };
            let total: i64 = sqlx::query_scalar(
                "select count(*) from audit_entries
                  where ($1::timestamptz is null or at >= $1) and ($2::timestamptz is null or at < $2)
                    and ($3::uuid is null or account_id = $3)",
            )
            .bind(from)
            .bind(to)
            .bind(account)
            .fetch_one(pool)
            .await?;
            // Readable by its owner alone: a JSON Lines export opens the
            // entries' sealed addresses and user agents.
            let mut file = std::io::BufWriter::new({
                use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&out)?;
                // A file there already keeps its mode otherwise.
                file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                file
            });
            if csv {
                file.write_all(crate::audit::CSV_HEADER.as_bytes())?;
            }
            let mut f = crate::audit::Filter {
                account,
                from,
                to,
                ..Default::default()
            };
            let shows = if csv {
                crate::audit::Shows::NoOrigin
            } else {
                crate::audit::Shows::Everything
            };
            let mut written = 0i64;
            loop {
                let page = crate::audit::query(pool, &f, 1000, true, shows).await?;
                let Some(last) = page.last() else { break };
                f.cursor = Some(last.seq);
                for e in &page {
                    if csv {
                        file.write_all(crate::audit::csv_line(e).as_bytes())?;
                    } else {
                        serde_json::to_writer(&mut file, e)?;
                        file.write_all(b"\n")?;
                    }
                }
                written += page.len() as i64;
                // A progress line on long exports.
                if total > 1000 {
                    let pct = written * 100 / total.max(1);
                    let bar = "#".repeat((pct / 5) as usize);
                    eprint!("\r[{bar:<20}] {pct:>3}%  {written}/{total}");
                }
                if page.len() < 1000 {
                    break;
                }
            }
            if total > 1000 {
                eprintln!();
            }
            file.flush()?;
            println!("{written} entries written to {}", out.display());
        }
    }
    Ok(0)
}

async fn replay(
    pool: &sqlx::PgPool,
    config: &Config,
    filter: &slate_events::stripe::ReplayFilter,
) -> anyhow::Result<i32> {
    let ids = slate_events::stripe::select_for_replay(pool, filter).await?;
    let options = crate::stripe::reconcile::replay_options(config.stripe_client()?);
    let total = ids.len();
    println!("replaying {total} event(s)");
    let (mut ok, mut failed) = (0usize, 0usize);
    for (i, id) in ids.iter().enumerate() {
        match slate_events::stripe::process_with(pool, &config.stripe_catalog, id, &options).await {
            Ok(outcome) => {
                ok += 1;
                println!("{id}  {}", outcome.describe());
            }
            Err(e) => {
                failed += 1;
                println!("{id}  FAILED: {e}");
            }
        }
        if total > 50 && (i + 1) % 50 == 0 {
            eprintln!("[{:>5}/{total}] {:>3}%", i + 1, (i + 1) * 100 / total);
        }
    }
    println!("{ok} processed, {failed} failed");
    Ok(if failed > 0 { 1 } else { 0 })
}

fn schema(out: &std::path::Path, check: bool) -> anyhow::Result<i32> {
    let files = slate_events::catalog::schema_files();
    if check {
        let mut stale = Vec::new();
        for f in &files {
            let current = std::fs::read_to_string(out.join(&f.file_name)).unwrap_or_default();
            if current != f.contents {
                stale.push(f.file_name.clone());
            }
        }
        if !stale.is_empty() {
            println!(
                "stale schema files (run `slate events schema`): {}",
                stale.join(", ")
            );
            return Ok(1);
        }
        println!("{} schema files up to date", files.len());
        return Ok(0);
    }
    std::fs::create_dir_all(out)?;
    for f in &files {
        std::fs::write(out.join(&f.file_name), &f.contents)?;
    }
    println!("wrote {} schema files to {}", files.len(), out.display());
    Ok(0)
}

fn openapi(out: &std::path::Path, check: bool) -> anyhow::Result<i32> {
    let document = crate::http::openapi::pretty();
    if check {
        let current = std::fs::read_to_string(out).unwrap_or_default();
        if current != document {
            println!(
                "stale {} (run `slate openapi` and commit it)",
                out.display()
            );
            return Ok(1);
        }
        println!("{} up to date", out.display());
        return Ok(0);
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, document)?;
    println!("wrote {}", out.display());
    Ok(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "host".into())
}
