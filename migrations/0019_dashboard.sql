-- The web dashboard (issue 14): sign-in sessions, and the indexes its filters and the
-- retention sweep need at a million finished jobs.

-- A browser session made from a pasted API token. The cookie holds a random secret; only its
-- SHA-256 is stored. The session acts with its token's role, and dies with the token
-- (revocation is checked on every request by the join, deletion cascades).
CREATE TABLE dashboard_sessions (
    id_hash    bytea PRIMARY KEY,
    token_id   uuid NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);

-- Runs filtered by worker and the dead-letter view, newest first (keyset on id), like
-- jobs_status_idx and jobs_event_idx do for status and event.
CREATE INDEX jobs_worker_idx ON jobs (worker_id, id DESC) WHERE worker_id IS NOT NULL;
CREATE INDEX jobs_dead_idx ON jobs (id DESC) WHERE dead;
CREATE INDEX jobs_schedule_idx ON jobs (schedule_id, id DESC) WHERE schedule_id IS NOT NULL;

-- Deleting a job (BATON_RETENTION_DAYS) clears the references to it: without these indexes
-- each deleted row would scan the whole jobs table (children's parent, reruns) and outbox.
CREATE INDEX jobs_parent_idx ON jobs (parent_job_id) WHERE parent_job_id IS NOT NULL;
CREATE INDEX jobs_rerun_of_idx ON jobs (rerun_of) WHERE rerun_of IS NOT NULL;
CREATE INDEX message_outbox_job_idx ON message_outbox (job_id) WHERE job_id IS NOT NULL;
