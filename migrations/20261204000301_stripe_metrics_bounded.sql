-- /metrics read the whole Stripe mirror at every scrape (three scans of a
-- table that is kept for ever, for replay): about 2.8 s at 1 M events. Each
-- Stripe figure now reads a bounded part of it.
--
-- Processing lag: the maintenance sweep folds the events processed before a
-- watermark into per-bucket totals (slate_workers::stripe::fold_processing_lag),
-- and a scrape adds those totals to the events processed since, found by
-- this index. Rows are only indexed once processed (ingest is unchanged).
create index stripe_events_processed_at_idx on stripe_events (processed_at)
    where processed_at is not null;

-- Events the typed parser could not read: few, counted from their own index
-- (ingest writes an entry only for such an event).
create index stripe_events_unparsed_idx on stripe_events (received_at)
    where not parsed;

-- Processings folded so far, by the job histogram's bucket bounds (seconds
-- from receipt to processed; 'Infinity' holds every one).
create table stripe_lag_retired (
    le      double precision primary key,
    events  bigint not null,
    seconds double precision not null
);

-- Events processed before `upto` are in stripe_lag_retired; those processed
-- since are counted at each scrape. One row.
create table stripe_lag_watermark (
    one  boolean primary key default true check (one),
    upto timestamptz not null
);
insert into stripe_lag_watermark (upto) values ('epoch');
