-- Second factor for staff (RFC 6238). The TOTP secret is sealed with the
-- server key (AES-256-GCM); its plaintext is never stored.
create table totp_secrets (
    account_id uuid primary key,
    sealed     text not null,
    last_step  bigint not null default 0,   -- a code is accepted once
    created_at timestamptz not null default now()
);
