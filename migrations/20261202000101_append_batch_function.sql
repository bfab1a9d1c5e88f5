-- Group commit: many independent appends (each to its own stream, each with
-- its own expected version) in one statement, so concurrent callers share
-- one transaction and one WAL flush. Every item gets its own outcome, as if
-- it had been appended alone, in item order:
--   appended | duplicate | key_reused | conflict  (as slate_append_events)
--   raced     a concurrent writer took the stream's next version first;
--             nothing of this item was written (the caller retries it alone)
-- A conflict or race of one item never aborts the others. Single-event items
-- (the common case) run without a subtransaction, so a big batch does not
-- overflow the backend's cache of subtransaction ids; an item of several
-- events gets one, so that a race undoes exactly that item.
create function slate_append_batch(
    p_stream_ids      text[],    -- per item
    p_expected        integer[], -- per item; null: any version; 0: must not exist
    p_counts          integer[], -- per item: how many of the events below
    p_ids             uuid[],    -- per event, items' events consecutively
    p_types           text[],
    p_schema_versions smallint[],
    p_payloads        jsonb[],
    p_metadata        jsonb[]
)
returns table (item integer, status text, version integer, positions bigint[])
language plpgsql as $$
declare
    v_offset   integer := 0;
    v_n        integer;
    v_stream   text;
    v_position bigint;
    v_found    text;
    v_version  integer;
    v_current  integer;
    r          record;
begin
    for i in 1 .. coalesce(cardinality(p_stream_ids), 0) loop
        item := i;
        v_n := p_counts[i];
        v_stream := p_stream_ids[i];
        if v_n = 1 then
            v_position := null;
            select e.global_position, e.stream_id, e.stream_version
              into v_position, v_found, v_version
              from events e where e.event_id = p_ids[v_offset + 1];
            if v_position is not null then
                if v_found = v_stream then
                    status := 'duplicate';
                    version := v_version;
                    positions := array[v_position];
                else
                    status := 'key_reused';
                    version := null;
                    positions := null;
                end if;
            else
                select coalesce(max(e.stream_version), 0) into v_current
                  from events e where e.stream_id = v_stream;
                if p_expected[i] is not null and v_current <> p_expected[i] then
                    status := 'conflict';
                    version := v_current;
                    positions := null;
                else
                    insert into events (event_id, stream_id, stream_version, event_type,
                                        schema_version, payload, metadata)
                    values (p_ids[v_offset + 1], v_stream, v_current + 1, p_types[v_offset + 1],
                            p_schema_versions[v_offset + 1], p_payloads[v_offset + 1],
                            p_metadata[v_offset + 1])
                    on conflict do nothing
                    returning global_position into v_position;
                    if v_position is null then
                        status := 'raced';
                        version := null;
                        positions := null;
                    else
                        status := 'appended';
                        version := v_current + 1;
                        positions := array[v_position];
                    end if;
                end if;
            end if;
        else
            begin
                select a.status, a.version, a.positions into r
                  from slate_append_events(
                        v_stream, p_expected[i],
                        p_ids[v_offset + 1 : v_offset + v_n],
                        p_types[v_offset + 1 : v_offset + v_n],
                        p_schema_versions[v_offset + 1 : v_offset + v_n],
                        p_payloads[v_offset + 1 : v_offset + v_n],
                        p_metadata[v_offset + 1 : v_offset + v_n]) a;
                status := r.status;
                version := r.version;
                positions := r.positions;
            exception when sqlstate 'SL010' then
                status := 'raced';
                version := null;
                positions := null;
            end;
        end if;
        return next;
        v_offset := v_offset + v_n;
    end loop;
end;
$$;
