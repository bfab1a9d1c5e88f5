-- Completion webhooks (Standard Webhooks): where to tell, and the
-- per-account signing secret (not in the log: it is a secret).
alter table generation_inputs add column webhook_url text;

create table webhook_secrets (
    account_id uuid primary key,
    secret     text not null,          -- whsec_<base64 of 24 random bytes>
    created_at timestamptz not null default now()
);
