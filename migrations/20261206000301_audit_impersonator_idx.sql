-- A search by actor (`/admin/audit?actor=`, `slate audit query --actor`)
-- also finds what a staff member did while impersonating someone: those
-- entries name the account acted for as their actor and the staff member
-- as `impersonator`. This index is that branch's, as
-- `audit_entries_actor_idx` is the other's; only impersonated entries are
-- in it.
create index audit_entries_impersonator_idx
    on audit_entries (impersonator, seq) where impersonator is not null;
