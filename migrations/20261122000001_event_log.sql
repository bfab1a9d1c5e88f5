-- The append-only event log. Every user action and every external input is an event here.
create table events (
    global_position bigint generated always as identity primary key,
    event_id        uuid not null unique,
    stream_id       text not null,
    stream_version  integer not null check (stream_version > 0),
    event_type      text not null,
    schema_version  smallint not null check (schema_version > 0),
    payload         jsonb not null,
    metadata        jsonb not null default '{}'::jsonb,
    recorded_at     timestamptz not null default now(),
    transaction_id  xid8 not null default pg_current_xact_id(),
    unique (stream_id, stream_version)
);

-- Gap-safe readers order and checkpoint by (transaction_id, global_position).
create index events_transaction_position_idx on events (transaction_id, global_position);
create index events_type_idx on events (event_type, global_position);

-- The database itself refuses to change history.
create function events_refuse_change() returns trigger
language plpgsql as $$
begin
    raise exception 'events are append-only: % refused', tg_op
        using errcode = 'SL001';
end;
$$;

create trigger events_no_update before update on events
    for each row execute function events_refuse_change();
create trigger events_no_delete before delete on events
    for each row execute function events_refuse_change();
create trigger events_no_truncate before truncate on events
    for each statement execute function events_refuse_change();

-- Wake up projectors at commit time instead of making them poll.
create function events_notify() returns trigger
language plpgsql as $$
begin
    perform pg_notify('slate_events', '');
    return null;
end;
$$;

create trigger events_notify after insert on events
    for each statement execute function events_notify();

-- Append one event at the next version of its stream. Used by the stored
-- functions that hold a lock on the stream's aggregate row, so the version
-- they compute cannot race with another writer of the same stream.
create function slate_append(
    p_stream_id text,
    p_event_type text,
    p_schema_version smallint,
    p_payload jsonb,
    p_metadata jsonb
) returns bigint
language plpgsql as $$
declare
    v_version integer;
    v_position bigint;
begin
    select coalesce(max(stream_version), 0) + 1 into v_version
      from events where stream_id = p_stream_id;
    insert into events (event_id, stream_id, stream_version, event_type, schema_version, payload, metadata)
    values (gen_random_uuid(), p_stream_id, v_version, p_event_type, p_schema_version, p_payload,
            coalesce(p_metadata, '{}'::jsonb))
    returning global_position into v_position;
    return v_position;
end;
$$;

-- One checkpoint per asynchronous projection.
create table projection_checkpoints (
    projection      text primary key,
    last_transaction_id xid8 not null default '0'::xid8,
    last_position   bigint not null default 0,
    events_applied  bigint not null default 0,
    updated_at      timestamptz not null default now()
);
