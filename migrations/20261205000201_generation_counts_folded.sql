-- /metrics counted every generation at every scrape (a sequential scan of
-- the whole table: about 160 ms at 1 M rows, and generations are kept for
-- good). Each count now reads a bounded part of it.
--
-- Finished generations (succeeded, failed, canceled: a generation has
-- exactly one outcome, which never changes) are stamped with their
-- outcome's time, and the maintenance sweep folds those finished before a
-- watermark into per kind and status totals
-- (slate_workers::generations::fold_counts). A scrape adds those totals to
-- the generations finished since, found by this index, and to the queued
-- and running ones, counted from their own index. An account's purge
-- deletes its generations; it takes those already folded off the totals
-- (slate_events::projections::generations, under the watermark's lock).
alter table generations add column finished_at timestamptz;

-- The stamp the projection gives a finished generation: its outcome
-- event's time.
update generations g
   set finished_at = e.recorded_at
  from events e
 where e.stream_id = 'generation-' || g.generation_id::text
   and e.event_type in ('GenerationSucceeded', 'GenerationFailed', 'GenerationCanceled')
   and g.status in ('succeeded', 'failed', 'canceled');

create index generations_finished_idx on generations (finished_at) where finished_at is not null;
create index generations_unfinished_idx on generations (kind, status) where status in ('queued', 'running');

-- Finished generations folded so far, by kind and status.
create table generations_finished_retired (
    kind        text not null,
    status      text not null,
    generations bigint not null,
    primary key (kind, status)
);

-- Generations finished before `upto` are in generations_finished_retired;
-- those finished since are counted at each scrape. One row.
create table generation_count_watermark (
    one  boolean primary key default true check (one),
    upto timestamptz not null
);
insert into generation_count_watermark (upto) values ('epoch');
