-- no-transaction
--
-- An account's export (`GET /v1/account/export`) pages through the events
-- naming it (`payload->>'account_id'`) and those of its own stream, in log
-- order. With no index on the account it walked the whole log in order at
-- every page and filtered each event: 0.8-1.1 s a page at 2 M events in
-- psql for an account of 100 events, growing with the log, not with the
-- account, and the last (empty) page read from the account's last event to
-- the end once more. Through this index a page is a range of the account's
-- own entries (0.5 ms there). Events naming no account have no entry.
--
-- Built CONCURRENTLY so that appends go on while it builds on a large log,
-- one statement alone in this file, as 20261205000301 (whose notes apply:
-- run one `slate migrate` at a time; a failed build leaves an invalid
-- index of this name, to drop with `drop index concurrently
-- events_account_idx` before running the migration again).
create index concurrently events_account_idx
    on events ((payload->>'account_id'), global_position)
    where payload->>'account_id' is not null;
