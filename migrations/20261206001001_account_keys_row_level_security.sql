-- Reads scoped to an account (the `slate_rls` role, src/http/scoped.rs)
-- open that account's sealed fields (an API key's label): they read its
-- data key, and only its own. Both statements lock `account_keys`, which
-- every authentication reads: give up rather than queue them all behind a
-- long transaction (run the migration again).
set local lock_timeout = '5s';
grant select on account_keys to slate_rls;
alter table account_keys enable row level security;
create policy account_keys_own_rows on account_keys to slate_rls
    using (account_id = slate_actor());
