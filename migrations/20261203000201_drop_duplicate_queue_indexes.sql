-- apalis.jobs carries two pairs of identical indexes from apalis-postgres's
-- own migrations: `unique_job_id` (id), created by its first migration, is
-- the same as `jobs_pkey` (id) added later, and `lidx` (lock_by) is the same
-- as `idx_apalis_jobs_lock_by`, which its index clean-up migration created
-- without dropping the older one. Every job insert wrote six index entries
-- instead of four, and every fetch, heartbeat and completion (each changes
-- lock_by or status, so none is a HOT update) wrote both copies again.
-- Nothing refers to the older two (the primary key and the lock_by index
-- serve the same lookups), so they go. `if exists`: a newer apalis-postgres
-- may clean them up itself.
drop index if exists apalis.unique_job_id;
drop index if exists apalis.lidx;
