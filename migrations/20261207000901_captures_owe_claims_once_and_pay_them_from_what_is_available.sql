-- Two corrections to the claims of `…000801`, and `held` written only when
-- there is some.
--
-- 1. A capture owed as much of its bucket's claim as its own draw, although
--    the bucket's other holds could still be released and give the claim
--    its credits. Which generation finished first then decided what the
--    account lost: A 100 expiring, holds of 50 and 50, expiry, refund of 60
--    (claim 60), capture of the first (owed 50), a grant of 50 (paid to the
--    debt), release of the second (10 to the claim, 40 lapsed): 0 left,
--    where the other order left 40. A capture now owes only what the
--    bucket's remaining holds cannot cover (`claim - (reserved - draw)`),
--    and the claim stays on them.
-- 2. What a capture owes is paid at once from the account's available
--    credits (soonest expiry first, then oldest, as a reservation draws),
--    `CreditsCaptured.settled`; the rest is debt. Credits given back while a
--    claim was open (a won dispute's restoration, a failed refund's return)
--    otherwise stayed spendable beside a debt for the same credits.
create or replace function credit_capture(p_generation uuid, p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql as $$
declare
    r credit_reservations;
    a credit_accounts;
    b credit_buckets;
    v_owed jsonb;
    v_debt bigint;
    v_left bigint;
    v_take bigint;
    v_settled jsonb := '[]'::jsonb;
    v_settle bigint := 0;
    v_payload jsonb;
begin
    r := credit_lock_reservation(p_generation);
    if r.status <> 'reserved' then
        return jsonb_build_object('outcome', 'already_' || r.status, 'status', r.status, 'amount', r.amount);
    end if;

    select coalesce(jsonb_agg(jsonb_build_object('bucket_id', o.bucket_id, 'amount', o.owed)
                              order by o.granted_position), '[]'::jsonb),
           coalesce(sum(o.owed), 0)::bigint
      into v_owed, v_debt
      from (select cb.bucket_id, cb.granted_position,
                   greatest(0, cb.revoked_held - (cb.reserved - d.amount)) as owed
              from credit_reservation_draws d join credit_buckets cb using (bucket_id)
             where d.generation_id = p_generation and cb.revoked_held > 0) o
     where o.owed > 0;

    if v_debt > 0 then
        select * into a from credit_accounts where account_id = r.account_id;
        v_left := least(v_debt, a.available);
        if v_left > 0 then
            for b in
                select * from credit_buckets
                 where account_id = r.account_id and not expired and remaining > 0
                 order by expires_at asc nulls last, granted_position asc
                 for update
            loop
                v_take := least(b.remaining, v_left);
                v_settled := v_settled || jsonb_build_array(
                    jsonb_build_object('bucket_id', b.bucket_id, 'amount', v_take));
                update credit_buckets set remaining = remaining - v_take where bucket_id = b.bucket_id;
                v_settle := v_settle + v_take;
                v_left := v_left - v_take;
                exit when v_left = 0;
            end loop;
            if v_left <> 0 then
                raise exception 'ledger inconsistent: buckets of % do not cover its available balance', r.account_id
                    using errcode = 'SL999';
            end if;
        end if;
    end if;

    v_payload := jsonb_build_object('account_id', r.account_id, 'generation_id', p_generation, 'amount', r.amount);
    if v_debt > 0 then
        v_payload := v_payload || jsonb_build_object('owed', v_owed);
    end if;
    if v_settle > 0 then
        v_payload := v_payload || jsonb_build_object('settled', v_settled);
    end if;
    perform slate_append('account-' || r.account_id, 'CreditsCaptured', 1::smallint, v_payload, p_metadata);

    update credit_reservations set status = 'captured', resolved_at = now() where generation_id = p_generation;
    update credit_buckets cb
       set reserved = cb.reserved - d.amount, consumed = cb.consumed + d.amount,
           revoked_held = least(cb.revoked_held, cb.reserved - d.amount)
      from credit_reservation_draws d
     where d.generation_id = p_generation and cb.bucket_id = d.bucket_id;
    update credit_accounts
       set reserved = reserved - r.amount, total_captured = total_captured + r.amount,
           available = available - v_settle,
           debt = debt + v_debt - v_settle, total_debt_added = total_debt_added + v_debt,
           total_debt_settled = total_debt_settled + v_settle
     where account_id = r.account_id;

    return jsonb_build_object('outcome', 'captured', 'status', 'captured', 'amount', r.amount);
end;
$$;

-- As before, with `held` in the event only when there is some: an earlier
-- release's projector reads such an event as it always did.
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
    v_payload jsonb;
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

    v_payload := jsonb_build_object('account_id', p_account, 'bucket_id', p_bucket, 'revoke_key', p_revoke_key,
                                    'stripe_object', b.stripe_object, 'amount', v_amount, 'taken', v_taken,
                                    'from_lapsed', v_from_lapsed, 'debt_added', v_debt, 'reason', p_reason);
    if v_held > 0 then
        v_payload := v_payload || jsonb_build_object('held', v_held);
    end if;
    perform slate_append('account-' || p_account, 'CreditsRevoked', 1::smallint, v_payload, p_metadata);

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
