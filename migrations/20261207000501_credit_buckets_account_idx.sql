-- no-transaction
--
-- An account's balance (`GET /v1/credits`, and its export) lists all its
-- buckets, spent ones too, in draw order; the only index of credit_buckets
-- by account holds the buckets with credits left
-- (credit_buckets_draw_order_idx), so each read scanned every bucket ever
-- granted, by every account: in psql over 1 M buckets of 100,000 accounts,
-- 53 ms a read (a parallel sequential scan), 0.16 ms through this index.
-- It also serves the purge's read of the account's purchases, for which
-- 20261207000401 built credit_buckets_paid_idx (dropped by the next
-- migration). Built CONCURRENTLY, alone in this file, as 20261206000801
-- (whose notes apply).
create index concurrently credit_buckets_account_idx
    on credit_buckets (account_id, expires_at nulls last, granted_position);
