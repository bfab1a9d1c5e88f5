-- The Stripe mirror: every verified event as received, keyed by Stripe's id.
-- Not a projection: it is the inbox that processing and replay read from.
create table stripe_events (
    stripe_event_id  text primary key,
    event_type       text not null,
    api_version      text,
    livemode         boolean not null,
    created          timestamptz not null,
    object_id        text,                      -- data.object.id
    payment_intent   text,                      -- data.object.payment_intent (charges, disputes)
    raw              text not null,             -- the exact bytes received
    source           text not null check (source in ('webhook', 'reconcile')),
    parsed           boolean not null,          -- the typed parser could read it
    parse_error      text,
    received_at      timestamptz not null default now(),
    last_received_at timestamptz not null default now(),
    delivery_count   integer not null default 1,
    status           text not null default 'pending'
                     check (status in ('pending', 'processed', 'ignored', 'failed')),
    attempts         integer not null default 0,
    last_error       text,
    outcome          text,
    processed_at     timestamptz
);
create index stripe_events_status_idx on stripe_events (status, received_at);
create index stripe_events_type_created_idx on stripe_events (event_type, created);
create index stripe_events_created_idx on stripe_events (created);
-- Processing reads every event about one object (its latest state wins).
create index stripe_events_object_idx on stripe_events (object_id, created);
-- A grant that arrives after a refund or dispute of its payment settles them.
create index stripe_events_payment_intent_idx on stripe_events (payment_intent) where payment_intent is not null;

-- Inline projection `billing`.
create table stripe_customers (
    customer_id text primary key,
    account_id  uuid not null,
    linked_at   timestamptz not null
);
create index stripe_customers_account_idx on stripe_customers (account_id);

create table stripe_subscriptions (
    subscription_id      text primary key,
    account_id           uuid not null,
    customer_id          text,
    status               text not null,
    price_id             text,
    current_period_start timestamptz,
    current_period_end   timestamptz,
    cancel_at_period_end boolean not null,
    canceled_at          timestamptz,
    state_at             timestamptz not null
);
create index stripe_subscriptions_account_idx on stripe_subscriptions (account_id);

create table billing_accounts (
    account_id   uuid primary key,
    past_due     boolean not null,
    invoice_id   text not null,
    state_at     timestamptz not null
);
