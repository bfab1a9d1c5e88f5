-- apalis.workers, like apalis.jobs (20261203000201), carries indexes twice
-- from apalis-postgres's own migrations: `lsidx` (last_seen) is the same as
-- `idx_apalis_workers_last_seen`, and `wtidx` (worker_type) the same as
-- `idx_apalis_workers_worker_type`. Every heartbeat changes last_seen, an
-- indexed column, so none is a HOT update and each wrote all six of the
-- table's index entries; now four. `unique_worker_id` (id) duplicates
-- `workers_pkey` too, but the foreign key from apalis.jobs.lock_by depends
-- on it, so it stays. `if exists`: a newer apalis-postgres may clean them up
-- itself.
drop index if exists apalis.lsidx;
drop index if exists apalis.wtidx;
