-- /metrics read every row of apalis.jobs at every scrape: the counts by
-- queue and status, and the durations of the Done jobs, which the retention
-- keeps for 7 days (millions of rows on a busy service). Each now reads a
-- bounded part of the table.
--
-- Done jobs: the maintenance sweep folds the durations of those finished
-- before a watermark into job_durations_retired
-- (slate_workers::jobs::fold_durations), and a scrape adds those totals to
-- the jobs finished since, found by this index. The retention deletes only
-- Done jobs already folded, so it no longer adds to the totals itself.
create index jobs_done_at_idx on apalis.jobs (done_at) where status = 'Done';

-- Every other job (pending, running, retrying, failed, killed) is counted
-- by queue and status from this index.
create index jobs_unfinished_idx on apalis.jobs (job_type, status) where status <> 'Done';

-- Done jobs finished before `upto` are in job_durations_retired; those
-- finished since are read at each scrape. One row.
create table job_duration_watermark (
    one  boolean primary key default true check (one),
    upto timestamptz not null
);
insert into job_duration_watermark (upto) values ('epoch');
