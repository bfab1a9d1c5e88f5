-- Asynchronous projection `audit_log`: one entry per action, for staff
-- investigation. `seq` is assigned in the order entries are applied, so
-- newest-first pagination by seq is stable while appends continue.
create table audit_entries (
    seq           bigint generated always as identity primary key,
    position      bigint not null unique,     -- the causing event's global_position
    event_id      uuid not null,
    at            timestamptz not null,
    actor_kind    text not null,               -- user, staff, operator, stripe, system
    actor_id      text,
    impersonator  uuid,
    action        text not null,
    account_id    uuid,
    targets       jsonb not null default '{}'::jsonb,
    outcome       text not null,               -- ok, refused, failed
    request_id    text,
    reason        text
);
create index audit_entries_account_idx on audit_entries (account_id, seq);
create index audit_entries_actor_idx on audit_entries (actor_id, seq);
create index audit_entries_action_idx on audit_entries (action, seq);
create index audit_entries_at_idx on audit_entries (at);
create index audit_entries_request_idx on audit_entries (request_id) where request_id is not null;
create index audit_entries_targets_idx on audit_entries using gin (targets jsonb_path_ops);
