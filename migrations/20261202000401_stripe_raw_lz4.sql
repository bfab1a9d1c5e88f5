-- A webhook body (a few KB) is compressed as it is stored. pglz was 4 % of
-- PostgreSQL's CPU under `slate bench` webhook ingest; lz4 compresses about
-- as well for JSON at a fraction of the cost. Applies to rows written from
-- now on (older rows stay readable as they are). A server built without lz4
-- keeps pglz.
do $$
begin
    alter table stripe_events alter column raw set compression lz4;
exception when feature_not_supported or invalid_parameter_value then
    raise notice 'lz4 is not available on this server; stripe_events.raw stays pglz';
end;
$$;
