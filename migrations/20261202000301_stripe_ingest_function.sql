-- Webhook ingest in one statement: mirror a batch of verified Stripe events,
-- append `StripeEventReceived` for each one mirrored for the first time, and
-- enqueue its processing job, all in the statement's own transaction when
-- called outside one (one round trip, one commit for the whole batch), or in
-- the caller's transaction inside one.
--
-- Rows are per distinct event, sorted by id (concurrent batches lock mirror
-- rows in the same order); p_deliveries counts the deliveries of each.
-- Returns, per row, whether this call mirrored it first. An event seen
-- before only gets its delivery count raised: no event, no job.
--
-- The job rows are what apalis-postgres's own push (queries/task/sink.sql)
-- writes: status Pending, no attempts yet, due now; its insert trigger
-- notifies the workers. A job id is a ULID made by the caller.
--
-- Appends go through slate_append_batch (expected version: any). An outcome
-- other than appended or duplicate (only possible if something else wrote
-- to a `stripe-…` stream first) fails the whole statement, so nothing of the
-- batch is written; the caller then retries each delivery alone.
create function slate_stripe_ingest(
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
        select b.status into v_failed
          from slate_append_batch(
                array(select 'stripe-' || p_ids[i] from unnest(v_new) with ordinality t(i, o) order by o),
                array(select null::integer from unnest(v_new)),
                array(select 1 from unnest(v_new)),
                array(select p_event_ids[i] from unnest(v_new) with ordinality t(i, o) order by o),
                array(select p_event_type from unnest(v_new)),
                array(select p_schema_version from unnest(v_new)),
                array(select p_payloads[i] from unnest(v_new) with ordinality t(i, o) order by o),
                array(select p_metadata[i] from unnest(v_new) with ordinality t(i, o) order by o)
             ) b
         where b.status not in ('appended', 'duplicate')
         limit 1;
        if v_failed is not null then
            raise exception 'StripeEventReceived could not be appended: %', v_failed
                using errcode = 'SL011';
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
