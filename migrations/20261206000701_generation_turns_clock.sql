-- The queue's clock for generation turns (migration `…20261206000501`),
-- corrected before release. It was the turn of the due job at the front of
-- the queue; a retried job keeps its early turn, so when one came due the
-- clock went back to it and a newcomer's whole batch was given turns ahead
-- of the accounts already waiting. The clock is now the later of the latest
-- turn among the jobs being worked on and the earliest turn waiting that
-- was never tried (with neither, the latest turn given); see
-- `slate_workers::generations::enqueue_in_turn`.
--
-- An account with no generation unfinished now starts at the clock instead
-- of after its last turn: one that queued a batch and cancelled it all is
-- not put behind everyone's backlog for it. (While some of its generations
-- are unfinished, its cancelled ones still count against its next turns.)
-- Whether an account has generations unfinished is read at each
-- submission, through this index.
create index generations_account_unfinished_idx on generations (account_id)
    where status in ('queued', 'running');
