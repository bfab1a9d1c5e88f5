-- Inline projection `affiliates`: who refers whom.
create table affiliates (
    affiliate_id  uuid primary key,
    name          text not null,
    referral_code text not null unique,
    rate_bps      integer not null check (rate_bps between 0 and 10000),
    created_at    timestamptz not null
);

create table account_referrals (
    account_id   uuid primary key,
    affiliate_id uuid not null,
    referred_at  timestamptz not null
);
create index account_referrals_affiliate_idx on account_referrals (affiliate_id);

-- Asynchronous projection `affiliate_commissions`: every commission
-- movement (earned, clawed back, paid out), in minor currency units.
create table affiliate_commission_entries (
    global_position bigint primary key,
    affiliate_id    uuid not null,
    account_id      uuid,
    kind            text not null check (kind in ('earned', 'clawback', 'payout')),
    stripe_object   text,
    currency        text not null,
    amount          bigint not null,   -- signed: earned +, clawback and payout -
    recorded_at     timestamptz not null
);
create index affiliate_commission_entries_affiliate_idx
    on affiliate_commission_entries (affiliate_id, global_position);
