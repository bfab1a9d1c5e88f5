-- A revocation no longer counts credits that are held as debt. It claims
-- them (`credit_buckets.revoked_held`) and their generation decides: a
-- release takes the claimed credits back for good (they were never spent),
-- a capture turns them into debt (they were).
--
-- Before: held credits became debt at once, and any credits that came in
-- next paid it. When the generation then failed, its credits came back to
-- their bucket. If that bucket had expired meanwhile they lapsed, and the
-- credits that had paid the debt for them were lost with them. Grant A 100
-- expiring, hold 40, expiry (60 lapse), refund A (60 from the lapsed, debt
-- 40), grant B 40 (paid all to the debt), release: the 40 lapsed, and the
-- account had 0 where, had the hold not been there, it kept B's 40. A bucket
-- that had not expired got the credits back instead, so a refunded grant was
-- spendable again.
--
-- Events: `CreditsRevoked.held`, `CreditsCaptured.owed` (per bucket) and
-- `ReleasedDraw.revoked` are new, zero or empty in earlier events, which
-- followed the old rule and replay as recorded. Held credits an earlier
-- revocation already made debt keep the old rule.

alter table credit_buckets add column revoked_held bigint not null default 0;
alter table credit_buckets
    add constraint credit_buckets_revoked_held_check check (revoked_held >= 0 and revoked_held <= reserved);
alter table credit_revocations add column held bigint not null default 0;
alter table credit_accounts add column total_debt_added bigint not null default 0;

update credit_accounts a
   set total_debt_added = r.added
  from (select account_id, sum(debt_added)::bigint as added from credit_revocations group by 1) r
 where r.account_id = a.account_id;

create or replace function credit_revoke(
    p_account uuid,
    p_bucket uuid,
    p_amount bigint,
    p_revoke_key text,
    p_reason text,
    p_metadata jsonb default '{}'::jsonb
) returns jsonb
language plpgsql as $$
declare
    b credit_buckets;
    v credit_revocations;
    v_amount bigint;
    v_taken bigint;
    v_from_lapsed bigint;
    v_held bigint;
    v_debt bigint;
begin
    if p_amount is null or p_amount <= 0 then
        raise exception 'revoke amount must be positive' using errcode = 'SL003';
    end if;
    if p_revoke_key is null or length(p_revoke_key) = 0 then
        raise exception 'revoke key required' using errcode = 'SL003';
    end if;
    perform credit_lock_account(p_account);

    select * into v from credit_revocations where revoke_key = p_revoke_key;
    if found then
        if v.account_id <> p_account or v.bucket_id <> p_bucket or v.amount > p_amount then
            raise exception 'revoke key % already used with other arguments', p_revoke_key using errcode = 'SL004';
        end if;
        return jsonb_build_object('outcome', 'duplicate', 'amount', v.amount, 'taken', v.taken,
                                  'from_lapsed', v.from_lapsed, 'held', v.held, 'debt_added', v.debt_added);
    end if;

    select * into b from credit_buckets where bucket_id = p_bucket and account_id = p_account for update;
    if not found then
        raise exception 'unknown bucket % for account %', p_bucket, p_account using errcode = 'SL005';
    end if;

    -- Never take back more than the bucket ever held.
    v_amount := least(p_amount, b.amount - b.revoked);
    if v_amount <= 0 then
        return jsonb_build_object('outcome', 'nothing_to_revoke', 'amount', 0, 'taken', 0,
                                  'from_lapsed', 0, 'held', 0, 'debt_added', 0);
    end if;
    -- What is left, then what lapsed, then what is held (its generation
    -- decides), and only what was spent is owed.
    v_taken := least(b.remaining, v_amount);
    v_from_lapsed := least(b.lapsed - b.revoked_lapsed, v_amount - v_taken);
    v_held := least(b.reserved - b.revoked_held, v_amount - v_taken - v_from_lapsed);
    v_debt := v_amount - v_taken - v_from_lapsed - v_held;

    perform slate_append('account-' || p_account, 'CreditsRevoked', 1::smallint,
        jsonb_build_object('account_id', p_account, 'bucket_id', p_bucket, 'revoke_key', p_revoke_key,
                           'stripe_object', b.stripe_object, 'amount', v_amount, 'taken', v_taken,
                           'from_lapsed', v_from_lapsed, 'held', v_held, 'debt_added', v_debt,
                           'reason', p_reason),
        p_metadata);

    update credit_buckets
       set remaining = remaining - v_taken, revoked = revoked + v_amount,
           revoked_lapsed = revoked_lapsed + v_from_lapsed, revoked_held = revoked_held + v_held
     where bucket_id = p_bucket;
    update credit_accounts
       set available = available - v_taken, debt = debt + v_debt, total_revoked = total_revoked + v_taken,
           total_debt_added = total_debt_added + v_debt
     where account_id = p_account;
    insert into credit_revocations (revoke_key, account_id, bucket_id, amount, taken, from_lapsed, held,
                                    debt_added, revoked_at)
    values (p_revoke_key, p_account, p_bucket, v_amount, v_taken, v_from_lapsed, v_held, v_debt, now());

    return jsonb_build_object('outcome', 'revoked', 'amount', v_amount, 'taken', v_taken,
                              'from_lapsed', v_from_lapsed, 'held', v_held, 'debt_added', v_debt);
end;
$$;

-- A capture spends what it held; held credits a revocation claimed were
-- spent after all and are owed.
create or replace function credit_capture(p_generation uuid, p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql as $$
declare
    r credit_reservations;
    v_owed jsonb;
    v_debt bigint;
begin
    r := credit_lock_reservation(p_generation);
    if r.status <> 'reserved' then
        return jsonb_build_object('outcome', 'already_' || r.status, 'status', r.status, 'amount', r.amount);
    end if;

    select coalesce(jsonb_agg(jsonb_build_object('bucket_id', o.bucket_id, 'amount', o.owed)
                              order by o.granted_position), '[]'::jsonb),
           coalesce(sum(o.owed), 0)::bigint
      into v_owed, v_debt
      from (select cb.bucket_id, cb.granted_position, least(d.amount, cb.revoked_held) as owed
              from credit_reservation_draws d join credit_buckets cb using (bucket_id)
             where d.generation_id = p_generation and cb.revoked_held > 0) o
     where o.owed > 0;

    perform slate_append('account-' || r.account_id, 'CreditsCaptured', 1::smallint,
        case when v_debt = 0
             then jsonb_build_object('account_id', r.account_id, 'generation_id', p_generation, 'amount', r.amount)
             else jsonb_build_object('account_id', r.account_id, 'generation_id', p_generation, 'amount', r.amount,
                                     'owed', v_owed)
        end,
        p_metadata);

    update credit_reservations set status = 'captured', resolved_at = now() where generation_id = p_generation;
    update credit_buckets cb
       set reserved = cb.reserved - d.amount, consumed = cb.consumed + d.amount,
           revoked_held = cb.revoked_held - least(d.amount, cb.revoked_held)
      from credit_reservation_draws d
     where d.generation_id = p_generation and cb.bucket_id = d.bucket_id;
    update credit_accounts
       set reserved = reserved - r.amount, total_captured = total_captured + r.amount,
           debt = debt + v_debt, total_debt_added = total_debt_added + v_debt
     where account_id = r.account_id;

    return jsonb_build_object('outcome', 'captured', 'status', 'captured', 'amount', r.amount);
end;
$$;

-- A release gives a revocation the held credits it claimed; the rest settles
-- debt first, then goes back to its bucket, or lapses if the bucket expired.
create or replace function credit_release(p_generation uuid, p_reason text, p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql as $$
declare
    r credit_reservations;
    a credit_accounts;
    d record;
    v_debt bigint;
    v_revoked bigint;
    v_settle bigint;
    v_restore bigint;
    v_lapse bigint;
    v_sum_revoked bigint := 0;
    v_sum_restore bigint := 0;
    v_sum_lapse bigint := 0;
    v_sum_settle bigint := 0;
    v_draw jsonb;
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
        select rd.bucket_id, rd.amount, cb.expired, cb.revoked_held
          from credit_reservation_draws rd join credit_buckets cb using (bucket_id)
         where rd.generation_id = p_generation
         order by cb.granted_position
    loop
        -- Claimed by a revocation of the bucket: gone.
        v_revoked := least(d.amount, d.revoked_held);
        -- The rest settles any debt first.
        v_settle := least(v_debt, d.amount - v_revoked);
        v_debt := v_debt - v_settle;
        if d.expired then
            -- The bucket lapsed while the credits were held: the rest lapses now.
            v_lapse := d.amount - v_revoked - v_settle; v_restore := 0;
        else
            v_lapse := 0; v_restore := d.amount - v_revoked - v_settle;
        end if;
        v_draw := jsonb_build_object('bucket_id', d.bucket_id, 'amount', d.amount, 'restored', v_restore,
                                     'lapsed', v_lapse, 'debt_settled', v_settle);
        if v_revoked > 0 then
            v_draw := v_draw || jsonb_build_object('revoked', v_revoked);
        end if;
        v_draws := v_draws || jsonb_build_array(v_draw);
        update credit_buckets
           set reserved = reserved - d.amount, remaining = remaining + v_restore, lapsed = lapsed + v_lapse,
               revoked_held = revoked_held - v_revoked
         where bucket_id = d.bucket_id;
        v_sum_revoked := v_sum_revoked + v_revoked;
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
           total_revoked = total_revoked + v_sum_revoked,
           total_debt_settled = total_debt_settled + v_sum_settle
     where account_id = r.account_id;

    return jsonb_build_object('outcome', 'released', 'status', 'released', 'amount', r.amount,
                              'restored', v_sum_restore, 'lapsed', v_sum_lapse, 'debt_settled', v_sum_settle,
                              'revoked', v_sum_revoked);
end;
$$;
