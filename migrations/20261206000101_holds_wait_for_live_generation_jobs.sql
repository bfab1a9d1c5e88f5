-- A reservation's hold is the net for a generation whose job vanished. It
-- was also released under a generation whose job was alive but slow: queued
-- behind a backlog longer than the hold, or retrying a provider that took
-- longer than the hold over its attempts (five of up to 30 minutes each
-- against a hold of two hours). Such a generation then succeeded with its
-- credits back in the account, unbilled (the capture found the reservation
-- released). An expired hold is now released only once no live job of its
-- generation is left: none waiting, running, or failed with attempts to go
-- (a job stopped for good, killed or deleted, is as good as vanished).
-- `jobs_unfinished_idx` finds a queue's live jobs; only expired holds are
-- looked at, at each sweep.
create or replace function credit_release_stale_holds(
    p_now timestamptz default now(),
    p_limit integer default 1000,
    p_metadata jsonb default '{"actor":{"kind":"system"}}'::jsonb
) returns integer
language plpgsql as $$
declare
    v_generation uuid;
    n integer := 0;
begin
    perform pg_advisory_xact_lock(hashtext('slate.credit_sweeper'));
    for v_generation in
        select r.generation_id from credit_reservations r
         where r.status = 'reserved' and r.hold_expires_at <= p_now
           and not exists (
               select 1 from apalis.jobs j
                where j.job_type = 'slate.generations'
                  and j.status <> 'Done'
                  and (j.status in ('Pending', 'Queued', 'Running')
                       or (j.status = 'Failed' and j.attempts < j.max_attempts))
                  and convert_from(j.job, 'UTF8')::jsonb ->> 'generation_id' = r.generation_id::text)
         order by r.hold_expires_at, r.generation_id
         limit p_limit
    loop
        perform credit_release(v_generation, 'hold_expired', p_metadata);
        n := n + 1;
    end loop;
    return n;
end;
$$;
