-- Asynchronous projection: one row per credit movement, for the ledger view.
create table credit_ledger_entries (
    global_position bigint primary key,
    account_id      uuid not null,
    event_type      text not null,
    generation_id   uuid,
    bucket_id       uuid,
    delta_available bigint not null,
    delta_reserved  bigint not null,
    delta_debt      bigint not null,
    recorded_at     timestamptz not null
);
create index credit_ledger_entries_account_idx on credit_ledger_entries (account_id, global_position);
