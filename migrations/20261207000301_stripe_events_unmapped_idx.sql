-- no-transaction
--
-- The mirrored events whose `refs` are not written yet (20261207000101):
-- the sweep fills them oldest first, and a purge scans only these for its
-- needles. Empty once the sweep has caught up (a few rows waiting for their
-- processing after that). Built CONCURRENTLY, alone in this file, as
-- 20261206000801 (whose notes apply).
create index concurrently stripe_events_unmapped_idx on stripe_events (received_at)
    where refs is null;
