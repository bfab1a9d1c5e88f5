-- slate_stripe_ingest appends the StripeEventReceived events of a batch with
-- one set-based INSERT instead of one slate_append_events call per event.
--
-- Every event mirrored for the first time opens its own stream
-- (`stripe-<id>`), so its event is that stream's version 1: the batch's
-- events are inserted together at version 1, `on conflict do nothing`.
-- Only the rare rows that insert did not write (a stream something else
-- wrote to first, or an event id already stored) go through
-- slate_append_batch as before (expected version: any), which appends them
-- after what is there, reports a duplicate, or fails the statement.
--
-- Measured with `slate bench --only webhooks` (32 senders): the per-event
-- loop (a function call and two statements for each event, each with its
-- own executor start-up) was the largest part of PostgreSQL's share of a
-- delivery. Same signature, same results.
create or replace function slate_stripe_ingest(
    p_ids             text[],
    p_types           text[],
    p_api_versions    text[],
    p_livemode        boolean[],
    p_created         timestamptz[],
    p_object_ids      text[],
    p_raw             text[],
    p_sources         text[],
    p_parsed          boolean[],
    p_parse_errors    text[],
    p_payment_intents text[],
    p_deliveries      integer[],
    -- the StripeEventReceived event of each row
    p_event_ids       uuid[],
    p_event_type      text,
    p_schema_version  smallint,
    p_payloads        jsonb[],
    p_metadata        jsonb[],
    -- its processing job
    p_queue           text,
    p_job_ids         text[],
    p_jobs            bytea[],
    p_max_attempts    integer
)
returns table (mirrored_id text, is_first boolean)
language plpgsql as $$
declare
    v_new    integer[];
    v_rest   integer[];
    v_failed text;
begin
    with m as (
        insert into stripe_events as s (stripe_event_id, event_type, api_version, livemode,
            created, object_id, raw, source, parsed, parse_error, payment_intent, delivery_count)
        select * from unnest(p_ids, p_types, p_api_versions, p_livemode, p_created,
            p_object_ids, p_raw, p_sources, p_parsed, p_parse_errors, p_payment_intents,
            p_deliveries)
        on conflict (stripe_event_id) do update
            set delivery_count = s.delivery_count + excluded.delivery_count,
                last_received_at = now()
        returning s.stripe_event_id, (s.xmax = 0) as first
    )
    select coalesce(array_agg(u.i order by u.i) filter (where m.first), '{}')
      into v_new
      from unnest(p_ids) with ordinality u(id, i) join m on m.stripe_event_id = u.id;

    if cardinality(v_new) > 0 then
        -- Version 1 of each new stream, in id order, all at once.
        with ins as (
            insert into events (event_id, stream_id, stream_version, event_type,
                schema_version, payload, metadata)
            select p_event_ids[t.i], 'stripe-' || p_ids[t.i], 1, p_event_type,
                   p_schema_version, p_payloads[t.i], p_metadata[t.i]
              from unnest(v_new) with ordinality t(i, o)
             order by t.o
            on conflict do nothing
            returning event_id
        )
        select coalesce(array_agg(t.i order by t.o) filter (where ins.event_id is null), '{}')
          into v_rest
          from unnest(v_new) with ordinality t(i, o)
          left join ins on ins.event_id = p_event_ids[t.i];

        if cardinality(v_rest) > 0 then
            select b.status into v_failed
              from slate_append_batch(
                    array(select 'stripe-' || p_ids[i] from unnest(v_rest) with ordinality t(i, o) order by o),
                    array(select null::integer from unnest(v_rest)),
                    array(select 1 from unnest(v_rest)),
                    array(select p_event_ids[i] from unnest(v_rest) with ordinality t(i, o) order by o),
                    array(select p_event_type from unnest(v_rest)),
                    array(select p_schema_version from unnest(v_rest)),
                    array(select p_payloads[i] from unnest(v_rest) with ordinality t(i, o) order by o),
                    array(select p_metadata[i] from unnest(v_rest) with ordinality t(i, o) order by o)
                 ) b
             where b.status not in ('appended', 'duplicate')
             limit 1;
            if v_failed is not null then
                raise exception 'StripeEventReceived could not be appended: %', v_failed
                    using errcode = 'SL011';
            end if;
        end if;

        insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at, priority)
        select p_job_ids[i], p_queue, p_jobs[i], 'Pending', 0, p_max_attempts, now(), 0
          from unnest(v_new) with ordinality t(i, o) order by o;
    end if;

    return query
        select u.id, u.i = any(v_new)
          from unnest(p_ids) with ordinality u(id, i) order by u.i;
end;
$$;
