-- no-transaction
--
-- A refund or a lost dispute looks up the commission earned on its payment
-- (`affiliates::commission_of`: the commission events naming its
-- `stripe_object`). Through `events_type_idx` that read every commission
-- event ever recorded and compared each one's JSON; through this index it
-- is the payment's own few. Other events have no entry, so appends of
-- anything else do not write it.
--
-- Built CONCURRENTLY, one statement alone in this file, as 20261205000301
-- (whose notes apply: a failed build leaves an invalid index of this name,
-- to drop with `drop index concurrently events_commission_object_idx`
-- before running the migration again).
create index concurrently events_commission_object_idx
    on events ((payload->>'stripe_object'), global_position)
    where event_type in ('CommissionEarned', 'CommissionClawedBack');
