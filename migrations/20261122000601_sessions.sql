-- Browser sessions (OpenID Connect sign-in). Only the SHA-256 of a session
-- token is stored; the token lives in an HttpOnly cookie.
create table sessions (
    session_id    uuid primary key,
    account_id    uuid not null,
    token_hash    bytea not null unique,
    via           text not null,
    mfa_verified  boolean not null default false,
    created_at    timestamptz not null,
    expires_at    timestamptz not null,    -- absolute timeout
    ended_at      timestamptz,
    end_reason    text,
    last_seen_at  timestamptz              -- operational (idle timeout), not from the log
);
create index sessions_account_idx on sessions (account_id) where ended_at is null;

-- Sign-in attempts in flight: state (CSRF) and the nonce's hash, used once.
create table oidc_logins (
    state      text primary key,
    nonce_hash bytea not null,
    created_at timestamptz not null default now(),
    used_at    timestamptz
);
