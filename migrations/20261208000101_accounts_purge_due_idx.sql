-- no-transaction
--
-- Deleted accounts not purged yet, by when their grace period ends: read
-- by the maintenance sweep (`purge::schedule_due`, every 30 s) and by every
-- `/metrics` scrape (`slate_purges_due`). Without it both read the whole
-- accounts table. Only accounts waiting for their purge have an entry, so
-- other writes to `accounts` do not touch it.
--
-- Built CONCURRENTLY, one statement alone in this file, as 20261205000301
-- (whose notes apply: a failed build leaves an invalid index of this name,
-- to drop with `drop index concurrently accounts_purge_due_idx` before
-- running the migration again).
create index concurrently accounts_purge_due_idx
    on accounts (purge_after)
    where deleted_at is not null and purged_at is null;
