-- no-transaction
--
-- A purge reads the payments that bought an account credits (a dispute
-- names its charge, not the customer); the only index of credit_buckets by
-- account holds the buckets with credits left (credit_buckets_draw_order_idx),
-- so each purge read every bucket ever granted, by every account. Built
-- CONCURRENTLY, alone in this file, as 20261206000801 (whose notes apply).
create index concurrently credit_buckets_paid_idx on credit_buckets (account_id)
    where stripe_object is not null;
