-- One append logic instead of two: slate_append_batch (20261202000101)
-- carried its own copy of slate_append_events' steps for single-event items,
-- because slate_append_events raised SL010 when a racing writer took the
-- stream's next version, and catching that needs a subtransaction per item.
-- slate_append_events now reports that case as status 'raced' when nothing
-- was written (always so for one event) and raises only when some of several
-- events were written, so the batch calls it for every item and needs a
-- subtransaction only for items of several events.
create or replace function slate_append_events(
    p_stream_id       text,
    p_expected        integer,   -- null: any version; 0: the stream must not exist
    p_ids             uuid[],
    p_types           text[],
    p_schema_versions smallint[],
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    out status        text,      -- appended | duplicate | key_reused | conflict | raced
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
    if positions is null then
        -- Nothing written: a writer raced us to the stream's next version.
        status := 'raced';
        version := null;
        return;
    end if;
    if cardinality(positions) <> v_n then
        -- Some of several events written: only an error undoes them.
        raise exception 'stream % moved while appending', p_stream_id using errcode = 'SL010';
    end if;
    status := 'appended';
    version := v_current + v_n;
end;
$$;

create or replace function slate_append_batch(
    p_stream_ids      text[],
    p_expected        integer[],
    p_counts          integer[],
    p_ids             uuid[],
    p_types           text[],
    p_schema_versions smallint[],
    p_payloads        jsonb[],
    p_metadata        jsonb[]
)
returns table (item integer, status text, version integer, positions bigint[])
language plpgsql as $$
declare
    v_offset integer := 0;
    v_n      integer;
    r        record;
begin
    for i in 1 .. coalesce(cardinality(p_stream_ids), 0) loop
        item := i;
        v_n := p_counts[i];
        if v_n = 1 then
            -- One event: a race writes nothing and is reported, not raised,
            -- so no subtransaction is needed.
            select a.status, a.version, a.positions into r
              from slate_append_events(
                    p_stream_ids[i], p_expected[i],
                    p_ids[v_offset + 1 : v_offset + 1],
                    p_types[v_offset + 1 : v_offset + 1],
                    p_schema_versions[v_offset + 1 : v_offset + 1],
                    p_payloads[v_offset + 1 : v_offset + 1],
                    p_metadata[v_offset + 1 : v_offset + 1]) a;
        else
            begin
                select a.status, a.version, a.positions into r
                  from slate_append_events(
                        p_stream_ids[i], p_expected[i],
                        p_ids[v_offset + 1 : v_offset + v_n],
                        p_types[v_offset + 1 : v_offset + v_n],
                        p_schema_versions[v_offset + 1 : v_offset + v_n],
                        p_payloads[v_offset + 1 : v_offset + v_n],
                        p_metadata[v_offset + 1 : v_offset + v_n]) a;
            exception when sqlstate 'SL010' then
                select 'raced'::text as status, null::integer as version,
                       null::bigint[] as positions into r;
            end;
        end if;
        status := r.status;
        version := r.version;
        positions := r.positions;
        return next;
        v_offset := v_offset + v_n;
    end loop;
end;
$$;
