-- Inline projections: written in the same transaction as the events they
-- come from, and rebuildable from the log alone (`slate projections rebuild`).

create table accounts (
    account_id  uuid primary key,
    email       text not null,
    staff       boolean not null default false,
    created_at  timestamptz not null
);
create unique index accounts_email_idx on accounts (lower(email));

create table credit_accounts (
    account_id          uuid primary key,
    available           bigint not null default 0 check (available >= 0),
    reserved            bigint not null default 0 check (reserved >= 0),
    debt                bigint not null default 0 check (debt >= 0),
    total_granted       bigint not null default 0,
    total_captured      bigint not null default 0,
    total_lapsed        bigint not null default 0,
    total_revoked       bigint not null default 0,
    total_debt_settled  bigint not null default 0
);

-- Every grant is its own bucket.
create table credit_buckets (
    bucket_id        uuid primary key,
    account_id       uuid not null,
    source           text not null check (source in ('purchase', 'subscription', 'promotion', 'goodwill')),
    stripe_object    text,
    grant_key        text not null unique,
    amount           bigint not null check (amount > 0),
    debt_settled     bigint not null default 0 check (debt_settled >= 0),
    remaining        bigint not null check (remaining >= 0),
    reserved         bigint not null default 0 check (reserved >= 0),
    consumed         bigint not null default 0 check (consumed >= 0),
    lapsed           bigint not null default 0 check (lapsed >= 0),
    revoked          bigint not null default 0 check (revoked >= 0),
    revoked_lapsed   bigint not null default 0 check (revoked_lapsed >= 0),
    expires_at       timestamptz,
    expired          boolean not null default false,
    granted_position bigint not null,
    granted_at       timestamptz not null
);
create index credit_buckets_draw_order_idx
    on credit_buckets (account_id, expires_at nulls last, granted_position) where remaining > 0;
create index credit_buckets_due_idx on credit_buckets (expires_at) where not expired and expires_at is not null;
create index credit_buckets_stripe_object_idx on credit_buckets (stripe_object) where stripe_object is not null;

create table credit_reservations (
    generation_id   uuid primary key,
    account_id      uuid not null,
    amount          bigint not null check (amount > 0),
    status          text not null check (status in ('reserved', 'captured', 'released')),
    hold_expires_at timestamptz not null,
    reserved_at     timestamptz not null,
    resolved_at     timestamptz,
    release_reason  text
);
create index credit_reservations_hold_idx on credit_reservations (hold_expires_at) where status = 'reserved';
create index credit_reservations_account_idx on credit_reservations (account_id, reserved_at);

create table credit_reservation_draws (
    generation_id uuid not null,
    bucket_id     uuid not null,
    amount        bigint not null check (amount > 0),
    primary key (generation_id, bucket_id)
);

create table credit_revocations (
    revoke_key   text primary key,
    account_id   uuid not null,
    bucket_id    uuid not null,
    amount       bigint not null,
    taken        bigint not null,
    from_lapsed  bigint not null,
    debt_added   bigint not null,
    revoked_at   timestamptz not null
);

-- ---------------------------------------------------------------------------
-- The ledger's stored functions. Each locks the account row, decides, appends
-- the event and updates the projection in the caller's transaction. Business
-- outcomes (insufficient credits, already captured, duplicate) are returned as
-- jsonb; programming errors raise with an SLxxx SQLSTATE:
--   SL002 unknown account · SL003 invalid argument · SL004 key reused with
--   other arguments · SL005 unknown reservation or bucket
-- ---------------------------------------------------------------------------

create function credit_lock_account(p_account uuid) returns credit_accounts
language plpgsql as $$
declare
    a credit_accounts;
begin
    select * into a from credit_accounts where account_id = p_account for update;
    if not found then
        raise exception 'unknown account %', p_account using errcode = 'SL002';
    end if;
    return a;
end;
$$;

create function credit_grant(
    p_account uuid,
    p_amount bigint,
    p_source text,
    p_grant_key text,
    p_stripe_object text default null,
    p_expires_at timestamptz default null,
    p_reason text default null,
    p_metadata jsonb default '{}'::jsonb
) returns jsonb
language plpgsql as $$
declare
    a credit_accounts;
    b credit_buckets;
    v_settle bigint;
    v_bucket uuid := gen_random_uuid();
    v_pos bigint;
begin
    if p_amount is null or p_amount <= 0 then
        raise exception 'grant amount must be positive' using errcode = 'SL003';
    end if;
    if p_source is null or p_source not in ('purchase', 'subscription', 'promotion', 'goodwill') then
        raise exception 'unknown grant source %', p_source using errcode = 'SL003';
    end if;
    if p_grant_key is null or length(p_grant_key) = 0 then
        raise exception 'grant key required' using errcode = 'SL003';
    end if;
    a := credit_lock_account(p_account);

    select * into b from credit_buckets where grant_key = p_grant_key;
    if found then
        if b.account_id <> p_account or b.amount <> p_amount then
            raise exception 'grant key % already used with other arguments', p_grant_key using errcode = 'SL004';
        end if;
        return jsonb_build_object('outcome', 'duplicate', 'bucket_id', b.bucket_id, 'amount', b.amount,
                                  'debt_settled', b.debt_settled);
    end if;

    v_settle := least(a.debt, p_amount);
    v_pos := slate_append('account-' || p_account, 'CreditsGranted', 1::smallint,
        jsonb_build_object(
            'account_id', p_account, 'bucket_id', v_bucket, 'grant_key', p_grant_key,
            'amount', p_amount, 'source', p_source, 'stripe_object', p_stripe_object,
            'expires_at', p_expires_at, 'reason', p_reason, 'debt_settled', v_settle),
        p_metadata);

    insert into credit_buckets (bucket_id, account_id, source, stripe_object, grant_key, amount,
                                debt_settled, remaining, expires_at, granted_position, granted_at)
    values (v_bucket, p_account, p_source, p_stripe_object, p_grant_key, p_amount,
            v_settle, p_amount - v_settle, p_expires_at, v_pos, now());

    update credit_accounts
       set available = available + p_amount - v_settle,
           debt = debt - v_settle,
           total_granted = total_granted + p_amount,
           total_debt_settled = total_debt_settled + v_settle
     where account_id = p_account;

    return jsonb_build_object('outcome', 'granted', 'bucket_id', v_bucket, 'amount', p_amount,
                              'debt_settled', v_settle);
end;
$$;

-- Lapse the account's buckets that are past their expiry. The caller holds
-- the account lock.
create function credit_expire_account(p_account uuid, p_now timestamptz, p_metadata jsonb)
returns integer
language plpgsql as $$
declare
    b credit_buckets;
    n integer := 0;
begin
    for b in
        select * from credit_buckets
         where account_id = p_account and not expired and expires_at is not null and expires_at <= p_now
         order by expires_at, granted_position
         for update
    loop
        perform slate_append('account-' || p_account, 'CreditsExpired', 1::smallint,
            jsonb_build_object('account_id', p_account, 'bucket_id', b.bucket_id, 'amount', b.remaining),
            p_metadata);
        update credit_buckets
           set expired = true, lapsed = lapsed + remaining, remaining = 0
         where bucket_id = b.bucket_id;
        update credit_accounts
           set available = available - b.remaining, total_lapsed = total_lapsed + b.remaining
         where account_id = p_account;
        n := n + 1;
    end loop;
    return n;
end;
$$;

create function credit_expire(p_now timestamptz default now(),
                              p_metadata jsonb default '{"actor":{"kind":"system"}}'::jsonb)
returns integer
language plpgsql as $$
declare
    v_account uuid;
    n integer := 0;
begin
    -- One sweeper at a time, so sweepers never deadlock on each other's accounts.
    perform pg_advisory_xact_lock(hashtext('slate.credit_sweeper'));
    for v_account in
        select distinct account_id from credit_buckets
         where not expired and expires_at is not null and expires_at <= p_now
         order by account_id
    loop
        perform credit_lock_account(v_account);
        n := n + credit_expire_account(v_account, p_now, p_metadata);
    end loop;
    return n;
end;
$$;

create function credit_reserve(
    p_account uuid,
    p_generation uuid,
    p_amount bigint,
    p_hold_until timestamptz,
    p_now timestamptz default now(),
    p_metadata jsonb default '{}'::jsonb
) returns jsonb
language plpgsql as $$
declare
    a credit_accounts;
    r credit_reservations;
    b credit_buckets;
    v_left bigint := p_amount;
    v_take bigint;
    v_draws jsonb := '[]'::jsonb;
begin
    if p_amount is null or p_amount <= 0 then
        raise exception 'reservation amount must be positive' using errcode = 'SL003';
    end if;
    if p_hold_until is null or p_hold_until <= p_now then
        raise exception 'hold must end in the future' using errcode = 'SL003';
    end if;
    perform credit_lock_account(p_account);

    select * into r from credit_reservations where generation_id = p_generation;
    if found then
        if r.account_id <> p_account or r.amount <> p_amount then
            raise exception 'generation % already holds another reservation', p_generation using errcode = 'SL004';
        end if;
        return jsonb_build_object('outcome', 'duplicate', 'status', r.status, 'amount', r.amount);
    end if;

    perform credit_expire_account(p_account, p_now, p_metadata);
    select * into a from credit_accounts where account_id = p_account;
    if a.available < p_amount then
        return jsonb_build_object('outcome', 'insufficient', 'available', a.available,
                                  'shortfall', p_amount - a.available);
    end if;

    -- Soonest expiry first, then oldest.
    for b in
        select * from credit_buckets
         where account_id = p_account and not expired and remaining > 0
         order by expires_at asc nulls last, granted_position asc
         for update
    loop
        v_take := least(b.remaining, v_left);
        v_draws := v_draws || jsonb_build_array(jsonb_build_object('bucket_id', b.bucket_id, 'amount', v_take));
        v_left := v_left - v_take;
        exit when v_left = 0;
    end loop;
    if v_left <> 0 then
        raise exception 'ledger inconsistent: buckets of % do not cover its available balance', p_account
            using errcode = 'SL999';
    end if;

    perform slate_append('account-' || p_account, 'CreditsReserved', 1::smallint,
        jsonb_build_object('account_id', p_account, 'generation_id', p_generation, 'amount', p_amount,
                           'hold_expires_at', p_hold_until, 'draws', v_draws),
        p_metadata);

    insert into credit_reservations (generation_id, account_id, amount, status, hold_expires_at, reserved_at)
    values (p_generation, p_account, p_amount, 'reserved', p_hold_until, now());
    insert into credit_reservation_draws (generation_id, bucket_id, amount)
    select p_generation, (d->>'bucket_id')::uuid, (d->>'amount')::bigint from jsonb_array_elements(v_draws) d;
    update credit_buckets cb
       set remaining = cb.remaining - d.amount, reserved = cb.reserved + d.amount
      from (select (x->>'bucket_id')::uuid as bucket_id, (x->>'amount')::bigint as amount
              from jsonb_array_elements(v_draws) x) d
     where cb.bucket_id = d.bucket_id;
    update credit_accounts
       set available = available - p_amount, reserved = reserved + p_amount
     where account_id = p_account;

    return jsonb_build_object('outcome', 'reserved', 'status', 'reserved', 'amount', p_amount,
                              'available', a.available - p_amount, 'draws', v_draws);
end;
$$;

-- Find a reservation and lock its account; returns the reservation as seen under the lock.
create function credit_lock_reservation(p_generation uuid) returns credit_reservations
language plpgsql as $$
declare
    v_account uuid;
    r credit_reservations;
begin
    select account_id into v_account from credit_reservations where generation_id = p_generation;
    if not found then
        raise exception 'unknown reservation %', p_generation using errcode = 'SL005';
    end if;
    perform credit_lock_account(v_account);
    select * into r from credit_reservations where generation_id = p_generation;
    return r;
end;
$$;

create function credit_capture(p_generation uuid, p_metadata jsonb default '{}'::jsonb)
returns jsonb
language plpgsql as $$
declare
    r credit_reservations;
begin
    r := credit_lock_reservation(p_generation);
    if r.status <> 'reserved' then
        return jsonb_build_object('outcome', 'already_' || r.status, 'status', r.status, 'amount', r.amount);
    end if;

    perform slate_append('account-' || r.account_id, 'CreditsCaptured', 1::smallint,
        jsonb_build_object('account_id', r.account_id, 'generation_id', p_generation, 'amount', r.amount),
        p_metadata);

    update credit_reservations set status = 'captured', resolved_at = now() where generation_id = p_generation;
    update credit_buckets cb
       set reserved = cb.reserved - d.amount, consumed = cb.consumed + d.amount
      from credit_reservation_draws d
     where d.generation_id = p_generation and cb.bucket_id = d.bucket_id;
    update credit_accounts
       set reserved = reserved - r.amount, total_captured = total_captured + r.amount
     where account_id = r.account_id;

    return jsonb_build_object('outcome', 'captured', 'status', 'captured', 'amount', r.amount);
end;
$$;

create function credit_release(p_generation uuid, p_reason text, p_metadata jsonb default '{}'::jsonb)
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
        if d.expired then
            -- The bucket lapsed while the credits were held: they lapse now.
            v_lapse := d.amount; v_settle := 0; v_restore := 0;
        else
            -- Credits coming back settle any debt first.
            v_lapse := 0;
            v_settle := least(v_debt, d.amount);
            v_restore := d.amount - v_settle;
            v_debt := v_debt - v_settle;
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

-- Take back credits of one grant (a refund or a lost dispute). What is left in
-- the bucket is taken; what had lapsed is simply gone; what was already spent
-- or is held becomes debt, settled from the next credits that come in.
create function credit_revoke(
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
                                  'from_lapsed', v.from_lapsed, 'debt_added', v.debt_added);
    end if;

    select * into b from credit_buckets where bucket_id = p_bucket and account_id = p_account for update;
    if not found then
        raise exception 'unknown bucket % for account %', p_bucket, p_account using errcode = 'SL005';
    end if;

    -- Never take back more than the bucket ever held.
    v_amount := least(p_amount, b.amount - b.revoked);
    if v_amount <= 0 then
        return jsonb_build_object('outcome', 'nothing_to_revoke', 'amount', 0, 'taken', 0,
                                  'from_lapsed', 0, 'debt_added', 0);
    end if;
    v_taken := least(b.remaining, v_amount);
    v_from_lapsed := least(b.lapsed - b.revoked_lapsed, v_amount - v_taken);
    v_debt := v_amount - v_taken - v_from_lapsed;

    perform slate_append('account-' || p_account, 'CreditsRevoked', 1::smallint,
        jsonb_build_object('account_id', p_account, 'bucket_id', p_bucket, 'revoke_key', p_revoke_key,
                           'stripe_object', b.stripe_object, 'amount', v_amount, 'taken', v_taken,
                           'from_lapsed', v_from_lapsed, 'debt_added', v_debt, 'reason', p_reason),
        p_metadata);

    update credit_buckets
       set remaining = remaining - v_taken, revoked = revoked + v_amount,
           revoked_lapsed = revoked_lapsed + v_from_lapsed
     where bucket_id = p_bucket;
    update credit_accounts
       set available = available - v_taken, debt = debt + v_debt, total_revoked = total_revoked + v_taken
     where account_id = p_account;
    insert into credit_revocations (revoke_key, account_id, bucket_id, amount, taken, from_lapsed, debt_added, revoked_at)
    values (p_revoke_key, p_account, p_bucket, v_amount, v_taken, v_from_lapsed, v_debt, now());

    return jsonb_build_object('outcome', 'revoked', 'amount', v_amount, 'taken', v_taken,
                              'from_lapsed', v_from_lapsed, 'debt_added', v_debt);
end;
$$;

-- Release reservations whose hold ran out: the job that should have resolved
-- them vanished. Credits are never stranded.
create function credit_release_stale_holds(
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
        select generation_id from credit_reservations
         where status = 'reserved' and hold_expires_at <= p_now
         order by hold_expires_at, generation_id
         limit p_limit
    loop
        perform credit_release(v_generation, 'hold_expired', p_metadata);
        n := n + 1;
    end loop;
    return n;
end;
$$;
