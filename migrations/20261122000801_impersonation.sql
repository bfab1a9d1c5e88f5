-- Inline projection: impersonations by staff. At most 60 minutes, never
-- extended; every request under one is recorded.
create table impersonations (
    impersonation_id uuid primary key,
    staff_id         uuid not null,
    account_id       uuid not null,
    reason           text not null,
    started_at       timestamptz not null,
    expires_at       timestamptz not null,
    ended_at         timestamptz
);
create index impersonations_account_idx on impersonations (account_id);
