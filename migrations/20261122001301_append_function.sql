-- The whole append in one round trip: the duplicate check (by event id),
-- the expected-version check and the insert. Outcomes are returned, not
-- raised, so a caller's transaction survives a conflict; only a writer that
-- raced us to the same stream version raises SL010 (nothing written; retry).
create function slate_append_events(
    p_stream_id       text,
    p_expected        integer,   -- null: any version; 0: the stream must not exist
    p_ids             uuid[],
    p_types           text[],
    p_schema_versions smallint[],
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    out status        text,      -- appended | duplicate | key_reused | conflict
    out version       integer,
    out positions     bigint[],
    out recorded_at   timestamptz
)
language plpgsql as $$
declare
    v_n       integer := cardinality(p_ids);
    v_stored  integer;
    v_same    integer;
    v_current integer;
begin
    recorded_at := now();
    select count(*), count(*) filter (where stream_id = p_stream_id), max(stream_version),
           array_agg(global_position order by global_position)
      into v_stored, v_same, version, positions
      from events where event_id = any(p_ids);
    if v_stored > 0 then
        if v_stored = v_n and v_same = v_n then
            status := 'duplicate';
        else
            status := 'key_reused';
            version := null;
            positions := null;
        end if;
        return;
    end if;

    select coalesce(max(stream_version), 0) into v_current
      from events where stream_id = p_stream_id;
    if p_expected is not null and v_current <> p_expected then
        status := 'conflict';
        version := v_current;
        positions := null;
        return;
    end if;

    with ins as (
        insert into events (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata)
        select id, p_stream_id, v_current + o::integer, t, sv, p, m
          from unnest(p_ids, p_types, p_schema_versions, p_payloads, p_metadata)
               with ordinality as x(id, t, sv, p, m, o)
         order by o
        on conflict do nothing
        returning global_position
    )
    select array_agg(global_position order by global_position) into positions from ins;
    if coalesce(cardinality(positions), 0) <> v_n then
        raise exception 'stream % moved while appending', p_stream_id using errcode = 'SL010';
    end if;
    status := 'appended';
    version := v_current + v_n;
end;
$$;

-- NOTIFY at commit takes a database-wide lock held through the commit's WAL
-- flush, so every appending transaction queued behind every other one (about
-- 400 commits/s here against 4,700 without it). Readers poll the log's tail
-- instead (slate_events::tail).
drop trigger events_notify on events;
drop function events_notify();
