-- Soft delete: access stops at once; restorable for 30 days; then purged.
alter table accounts
    add column deleted_at  timestamptz,
    add column purge_after timestamptz;
