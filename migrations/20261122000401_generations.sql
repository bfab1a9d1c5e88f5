-- Generations: approved prices, the reservation wrapper that refuses an
-- unpriced operation, the inline projection, private inputs, idempotency.

create table approved_operations (
    operation        text primary key,          -- '<kind>:<provider>'
    kind             text not null check (kind in ('video', 'voiceover', 'transcription', 'script')),
    provider         text not null,
    unit             text not null check (unit in ('generation', 'second')),
    credits_per_unit bigint not null check (credits_per_unit > 0),
    max_units        integer not null default 1 check (max_units > 0),
    approved_at      timestamptz not null default now()
);

insert into approved_operations (operation, kind, provider, unit, credits_per_unit, max_units) values
    ('video:local',          'video',         'local',      'second',     2, 60),
    ('voiceover:local',      'voiceover',     'local',      'generation', 2, 1),
    ('transcription:local',  'transcription', 'local',      'generation', 1, 1),
    ('script:local',         'script',        'local',      'generation', 1, 1),
    ('video:fal',            'video',         'fal',        'second',    10, 20),
    ('video:seedance',       'video',         'seedance',   'second',    10, 12),
    ('voiceover:elevenlabs', 'voiceover',     'elevenlabs', 'generation', 5, 1),
    ('transcription:whisper','transcription', 'whisper',    'generation', 3, 1),
    ('script:ark',           'script',        'ark',        'generation', 1, 1);

-- Reserve the approved price of `units` of an operation. An operation
-- without an approved price is refused here, whatever the caller believes.
--   SL006 operation not approved
create function credit_reserve_operation(
    p_account uuid,
    p_generation uuid,
    p_operation text,
    p_units integer,
    p_hold_until timestamptz,
    p_now timestamptz default now(),
    p_metadata jsonb default '{}'::jsonb
) returns jsonb
language plpgsql as $$
declare
    o approved_operations;
    v_cost bigint;
begin
    select * into o from approved_operations where operation = p_operation;
    if not found then
        raise exception 'operation % has no approved price', p_operation using errcode = 'SL006';
    end if;
    if p_units is null or p_units < 1 or p_units > o.max_units then
        raise exception 'units of % must be 1 to %', p_operation, o.max_units using errcode = 'SL003';
    end if;
    v_cost := o.credits_per_unit * p_units;
    return credit_reserve(p_account, p_generation, v_cost, p_hold_until, p_now, p_metadata)
        || jsonb_build_object('cost', v_cost);
end;
$$;

-- Inline projection `generations`.
create table generations (
    generation_id       uuid primary key,
    account_id          uuid not null,
    kind                text not null,
    provider            text not null,
    operation           text not null,
    units               integer not null,
    cost                bigint not null,
    collection_id       text not null,
    status              text not null
                        check (status in ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    attempts            integer not null default 0,
    provider_handle     text,
    cancel_requested    boolean not null default false,
    deadline            timestamptz,
    output_key          text,
    output_content_type text,
    output_bytes        bigint,
    width               integer,
    height              integer,
    duration_ms         bigint,
    failure_code        text,
    created_at          timestamptz not null,
    updated_at          timestamptz not null
);
create index generations_account_idx on generations (account_id, created_at desc, generation_id desc);
create index generations_deadline_idx on generations (deadline) where status in ('queued', 'running') and deadline is not null;

-- What the user asked for, kept out of the log (prompts are personal data;
-- erasing an account removes these rows) and out of job payloads.
create table generation_inputs (
    generation_id uuid primary key,
    prompt        text,
    input_key     text,
    parameters    jsonb not null default '{}'::jsonb
);

-- Idempotency-Key: the first response is stored and replayed.
create table idempotency_keys (
    account_id   uuid not null,
    key          text not null,
    request_hash bytea not null,
    status_code  integer,
    response     jsonb,
    created_at   timestamptz not null default now(),
    primary key (account_id, key)
);
