-- no-transaction
--
-- The purge's look-up of an account's mirrored Stripe events by the ids they
-- name (`refs && $needles`, 20261207000101). Rows not mapped yet have no
-- entry (`&&` is strict, so the look-up implies the predicate): ingest
-- writes nothing to this index; the row's processing does. Built
-- CONCURRENTLY, alone in this file, as 20261206000801 (whose notes apply).
create index concurrently stripe_events_refs_idx on stripe_events using gin (refs)
    where refs is not null;
