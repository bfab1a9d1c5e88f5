-- Crypto-shredding: one data key per account, wrapped with the server key.
-- Personal fields (emails in events, prompts) are sealed with it; erasing
-- `wrapped` makes every copy unreadable while the log stays append-only.
create table account_keys (
    account_id uuid primary key,
    wrapped    text,
    created_at timestamptz not null default now(),
    erased_at  timestamptz,
    check ((wrapped is null) = (erased_at is not null))
);

-- A purged account keeps its row (its credits and billing stay for the
-- books) without the email.
alter table accounts
    alter column email drop not null,
    add column purged_at timestamptz;
