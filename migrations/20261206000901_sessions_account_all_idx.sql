-- no-transaction
--
-- An account's export lists all its sessions, ended ones too; the only
-- index by account (sessions_account_idx) holds the open ones, so each
-- export read every session ever opened, by every account (none are
-- deleted). Built CONCURRENTLY, alone in this file, as 20261206000801.
create index concurrently sessions_account_all_idx on sessions (account_id);
