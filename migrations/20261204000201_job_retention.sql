-- Finished jobs leave the queue's table after a retention period (the
-- maintenance sweep, slate_workers::jobs::apply_retention): apalis.jobs
-- otherwise keeps a row for every job ever run, and /metrics reads them all
-- at every scrape.
--
-- The durations of the Done jobs deleted are added up here first, in the
-- same statement, so the job-duration histogram of /metrics stays
-- cumulative (a Prometheus counter never goes down).
create table job_durations_retired (
    job_type text not null,
    -- A bucket's upper bound in seconds, or 'Infinity' (every job).
    le       double precision not null,
    -- Retired Done jobs that took at most `le` from pickup to done, and the
    -- sum of their durations.
    jobs     bigint not null,
    seconds  double precision not null,
    primary key (job_type, le)
);

-- When a maintenance task that runs less often than the sweep (every 30 s)
-- last ran: one row per task, claimed by the sweep that runs it.
create table maintenance_runs (
    task     text primary key,
    last_run timestamptz not null
);
