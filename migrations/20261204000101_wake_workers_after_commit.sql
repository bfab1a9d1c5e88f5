-- apalis-postgres notifies the workers from a trigger on apalis.jobs, inside
-- the transaction that enqueues. PostgreSQL serialises notifying
-- transactions with a database-wide lock taken at commit and held until the
-- commit record is flushed, so every enqueuing transaction (each submission
-- of a generation, each batch of Stripe deliveries, …) waited in line behind
-- the WAL flushes of all the others: pgbench here ran about 400 such commits
-- a second at 8 or 32 clients, against about 4,700 without the NOTIFY.
--
-- The notification is now sent after the commit, by the enqueuer
-- (slate_workers::jobs::Wake), with a statement that writes nothing and so
-- waits for no flush. The workers also poll every second, so a job whose
-- wake-up is lost is still picked up. `if exists`: a newer apalis-postgres
-- may have changed them.
drop trigger if exists notify_workers on apalis.jobs;
drop function if exists apalis.notify_new_jobs();
