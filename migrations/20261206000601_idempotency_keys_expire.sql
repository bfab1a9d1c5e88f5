-- Idempotency keys expire 24 hours after their first use, as Stripe's do:
-- a retry within a day gets the first answer; later, the key is free again
-- (the submission is taken as a new one). The rows used to stay until the
-- account was purged. The maintenance sweep deletes expired keys, by this
-- index; until it has, an expired row is ignored by the replay and replaced
-- by the next request under its key.
create index idempotency_keys_created_idx on idempotency_keys (created_at);
