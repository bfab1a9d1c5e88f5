-- The GIN index of the ids mirrored Stripe events name
-- (stripe_events_refs_idx) takes its entries straight into its tree, not
-- through a pending list.
--
-- With `fastupdate` on (PostgreSQL's default) an insert appends its entries
-- to the index's pending list, and the statement that finds the list past
-- gin_pending_list_limit (4 MB) moves all of it into the tree itself. In
-- psql (pgbench, one client, a minute of processing-shaped updates of
-- 400,000 mirror rows, three ids each): with it on, five to fourteen updates
-- a minute took 120-505 ms, each holding its row meanwhile (p50 0.33-0.42
-- ms); with it off, the slowest took 45 ms (p50 0.38 ms). The sweep's
-- batches of 1,000 went at 23.6 a second with it off against 20.8 with it
-- on (p99 94 ms against 517 ms).
--
-- The ALTER takes the index's ACCESS EXCLUSIVE lock, which every insert and
-- update of stripe_events waits for: give up rather than queue ingest behind
-- a long transaction (run the migration again). What is pending already is
-- moved by the next vacuum of the table (or gin_clean_pending_list).
set local lock_timeout = '5s';
alter index stripe_events_refs_idx set (fastupdate = off);
