-- Undo 20261202000501: with `plan_cache_mode = force_generic_plan` on
-- slate_append_events, `slate bench` measured appends slower, not faster
-- (alternating runs against the previous build, over TCP and over a Unix
-- socket alike: one append per transaction 0.41–0.49 of the ceiling against
-- 0.61 alone; group commit at one caller about half), although a pgbench
-- loop over the function alone showed no difference. The planning it saved
-- (0.1 ms per append, pg_stat_statements) costs less than what it added.
alter function slate_append_events(text, integer, uuid[], text[], smallint[], jsonb[], jsonb[])
    reset plan_cache_mode;
