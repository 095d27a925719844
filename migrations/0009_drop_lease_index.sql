-- Every fenced write (`WHERE id = $1 AND lease_token = $2 AND lease_expires_at > now() …`)
-- could be served by this index, and with statistics taken when few jobs were leased the
-- planner preferred it to the primary key: each completion then walked the index entries of
-- every job completed within the last lease period (their old row versions still carry a
-- future expiry until vacuum), so a busy queue got slower the busier it was. The reaper, its
-- only intended user, finds leased jobs through `jobs_status_idx` instead (at most as many as
-- worker slots), and one index fewer is one write fewer per claim and completion.
DROP INDEX jobs_lease_idx;
