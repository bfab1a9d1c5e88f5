-- no-transaction
--
-- credit_buckets_account_idx (20261207000501) serves what
-- credit_buckets_paid_idx (20261207000401, the same day) was built for:
-- one index fewer to write at every grant and draw. Dropped CONCURRENTLY,
-- alone in this file.
drop index concurrently if exists credit_buckets_paid_idx;
