-- The target filter (`/admin/audit?target=`, `slate audit query --target`,
-- the console's search) and an entry's related entries look an id up among
-- an entry's targets, whatever its key (a generation, a Stripe event or
-- object, a key…). `audit_entries_targets_idx` (jsonb_path_ops on the
-- object) indexes each key with its value, so it cannot answer that, and
-- nothing used it: the lookup read the table newest first, all of it for
-- an id found nowhere (every console search asks for one). This index
-- holds each entry's target values as an array, which `?` and `?|` find.
create index audit_entries_target_values_idx
    on audit_entries using gin (jsonb_path_query_array(targets, '$.*'));
drop index audit_entries_targets_idx;
