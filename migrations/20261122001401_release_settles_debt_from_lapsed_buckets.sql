-- A release settles debt first whatever bucket its credits return to; only
-- what is left of a draw from a lapsed bucket lapses.
--
-- Before: credits held from a bucket that then lapsed came back lapsing
-- whole. When that bucket had been refunded meanwhile, the refund had already
-- counted the held credits as debt (they might have been spent), so the same
-- credits were taken twice — once as debt, once lapsing — and the account
-- owed credits it never spent (grant 100 expiring, hold 40, expiry, full
-- refund: debt 40; release: debt stayed 40 instead of 0). Released before the
-- expiry, the same history ended with no debt.
create or replace function credit_release(p_generation uuid, p_reason text, p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql as $$
declare
    r credit_reservations;
    a credit_accounts;
    d record;
    v_debt bigint;
    v_settle bigint;
    v_restore bigint;
    v_lapse bigint;
    v_sum_restore bigint := 0;
    v_sum_lapse bigint := 0;
    v_sum_settle bigint := 0;
    v_draws jsonb := '[]'::jsonb;
begin
    if p_reason is null or length(p_reason) = 0 then
        raise exception 'release reason required' using errcode = 'SL003';
    end if;
    r := credit_lock_reservation(p_generation);
    if r.status <> 'reserved' then
        return jsonb_build_object('outcome', 'already_' || r.status, 'status', r.status, 'amount', r.amount);
    end if;
    select * into a from credit_accounts where account_id = r.account_id;
    v_debt := a.debt;

    for d in
        select rd.bucket_id, rd.amount, cb.expired
          from credit_reservation_draws rd join credit_buckets cb using (bucket_id)
         where rd.generation_id = p_generation
         order by cb.granted_position
    loop
        -- Credits coming back settle any debt first.
        v_settle := least(v_debt, d.amount);
        v_debt := v_debt - v_settle;
        if d.expired then
            -- The bucket lapsed while the credits were held: the rest lapses now.
            v_lapse := d.amount - v_settle; v_restore := 0;
        else
            v_lapse := 0; v_restore := d.amount - v_settle;
        end if;
        v_draws := v_draws || jsonb_build_array(jsonb_build_object(
            'bucket_id', d.bucket_id, 'amount', d.amount, 'restored', v_restore,
            'lapsed', v_lapse, 'debt_settled', v_settle));
        update credit_buckets
           set reserved = reserved - d.amount, remaining = remaining + v_restore, lapsed = lapsed + v_lapse
         where bucket_id = d.bucket_id;
        v_sum_restore := v_sum_restore + v_restore;
        v_sum_lapse := v_sum_lapse + v_lapse;
        v_sum_settle := v_sum_settle + v_settle;
    end loop;

    perform slate_append('account-' || r.account_id, 'CreditsReleased', 1::smallint,
        jsonb_build_object('account_id', r.account_id, 'generation_id', p_generation, 'amount', r.amount,
                           'reason', p_reason, 'draws', v_draws),
        p_metadata);

    update credit_reservations
       set status = 'released', resolved_at = now(), release_reason = p_reason
     where generation_id = p_generation;
    update credit_accounts
       set reserved = reserved - r.amount,
           available = available + v_sum_restore,
           debt = debt - v_sum_settle,
           total_lapsed = total_lapsed + v_sum_lapse,
           total_debt_settled = total_debt_settled + v_sum_settle
     where account_id = r.account_id;

    return jsonb_build_object('outcome', 'released', 'status', 'released', 'amount', r.amount,
                              'restored', v_sum_restore, 'lapsed', v_sum_lapse, 'debt_settled', v_sum_settle);
end;
$$;
