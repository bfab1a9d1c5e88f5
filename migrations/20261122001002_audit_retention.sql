-- Audit entries are kept 18 months. The cutoff moves forward only; the
-- projection (live, rebuilt or verified) keeps nothing older than it. The
-- events stay.
create table audit_retention (
    id     boolean primary key default true check (id),
    cutoff timestamptz not null
);
insert into audit_retention (cutoff) values ('-infinity');
