-- Generations are handed out fairly between accounts (start-time fair
-- queuing). Jobs used to be fetched by priority, then by run_at: an account
-- that queued a thousand videos had everyone else's wait behind all of them,
-- their deadlines passing.
--
-- Each generation job now carries a turn (`fair_tag`), given when it is
-- enqueued, and the fetch takes the lowest turn first (run_at breaks ties).
-- An account's turns follow one another (its last turn plus one), and a turn
-- is never earlier than the turn at the front of the queue (the due job that
-- would be fetched next; when nothing is waiting, the latest turn given to
-- anyone). So an account that queued nothing for a while starts at the
-- front, level with the others, and a large batch takes one turn in every
-- round instead of the whole queue; what an account ran in the past is not
-- held against it. A retried job keeps its turn.
--
-- `generation_turns` holds each account's last turn (an id only, no personal
-- data; the purge deletes it with the account's other rows). A job without a
-- turn (any other queue, or a generation enqueued by a server of the
-- previous release during a rolling deploy) is fetched first, by run_at, as
-- before.
alter table apalis.jobs add column fair_tag bigint;

create table generation_turns (
    account_id uuid primary key,
    last_tag   bigint not null
);
create index generation_turns_last_idx on generation_turns (last_tag);

-- The fetch's order (`slate_workers::queue::fetch`), replacing
-- apalis-postgres's index of the same shape without the turn (keeping both
-- would write two entries for every job insert and status change).
create index jobs_fair_fetch_idx on apalis.jobs (job_type, priority desc, fair_tag asc nulls first, run_at asc)
    where status = 'Pending' or (status = 'Failed' and attempts < max_attempts);
drop index if exists apalis.idx_apalis_jobs_fetch_partial;
