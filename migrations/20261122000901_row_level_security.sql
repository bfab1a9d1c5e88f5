-- Defence in depth: user-owned tables carry row-level security keyed by a
-- per-transaction setting of the acting account. Request paths that read a
-- user's data switch to the `slate_rls` role and set `slate.account_id`
-- (see src/http/scoped.rs), so a query that forgets its WHERE clause still
-- returns only that account's rows — and none when the setting is missing.
do $$
begin
    create role slate_rls nologin;
exception when duplicate_object then null;
end
$$;

grant usage on schema public to slate_rls;
grant select on accounts, credit_accounts, credit_buckets, credit_reservations, credit_ledger_entries,
    generations, api_keys, sessions, stripe_customers, stripe_subscriptions, billing_accounts,
    webhook_secrets to slate_rls;

create function slate_actor() returns uuid
language sql stable as $$
    select nullif(current_setting('slate.account_id', true), '')::uuid
$$;
grant execute on function slate_actor() to slate_rls;

do $$
declare
    t text;
begin
    foreach t in array array['accounts', 'credit_accounts', 'credit_buckets', 'credit_reservations',
                             'credit_ledger_entries', 'generations', 'api_keys', 'sessions',
                             'stripe_customers', 'stripe_subscriptions', 'billing_accounts', 'webhook_secrets']
    loop
        execute format('alter table %I enable row level security', t);
        execute format('create policy %I on %I to slate_rls using (account_id = slate_actor())',
                       t || '_own_rows', t);
    end loop;
end
$$;
