-- Inline projection `access`: API keys. Only the SHA-256 of a key and its
-- public prefix are stored; the plaintext is shown once, at creation.
create table api_keys (
    key_id       uuid primary key,
    account_id   uuid not null,
    prefix       text not null unique,
    secret_hash  bytea not null,
    label        text,
    created_at   timestamptz not null,
    revoked_at   timestamptz,
    last_used_at timestamptz            -- operational, not from the log
);
create index api_keys_account_idx on api_keys (account_id);
