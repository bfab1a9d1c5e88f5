-- slate_append_events looks its event ids up with `event_id = any($ids)`.
-- For that condition PostgreSQL's plan cache never settles on a generic
-- plan (the custom plan, costed for the actual one-element array, always
-- looks cheaper than a generic one costed for an array of unknown size), so
-- every append planned the lookup anew: 0.1 ms of PostgreSQL's CPU per
-- append under `slate bench` (pg_stat_statements, track_planning). The
-- generic plan is the same index scan on events(event_id).
alter function slate_append_events(text, integer, uuid[], text[], smallint[], jsonb[], jsonb[])
    set plan_cache_mode = force_generic_plan;
