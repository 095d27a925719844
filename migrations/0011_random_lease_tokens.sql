-- Lease (fencing) tokens are drawn at random instead of from `lease_token_seq`.
--
-- A token from a sequence is guessable: the next claim's token is the last one seen plus a
-- little. A token is now 63 random bits (a positive bigint, never 0), hashed from
-- `gen_random_uuid()` (PostgreSQL's strong random source), so the protocol's `int64
-- lease_token` is unchanged. The api also accepts a job's reports only on the stream the job
-- was assigned (or resumed) to, so a token alone is never enough to write for a job.
CREATE FUNCTION random_lease_token() RETURNS bigint
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $fn$
    SELECT greatest(1, ('x' || substr(md5(gen_random_uuid()::text), 1, 16))::bit(64)::bigint
                       & 9223372036854775807)
$fn$;

CREATE OR REPLACE FUNCTION claim_jobs(p_worker uuid, p_executors text[], p_labels jsonb, p_limit bigint,
                                      p_lease_ms bigint)
RETURNS TABLE (id uuid, event_id uuid, attempt int, priority int, run_at timestamptz,
               lease_token bigint, lease_expires_at timestamptz, spec jsonb, input jsonb,
               parent_job_id uuid, root_job_id uuid, last_log_seq bigint)
LANGUAGE plpgsql
SET enable_bitmapscan = off
SET enable_sort = off
AS $fn$
BEGIN
    RETURN QUERY
    WITH picked AS (
        SELECT q.id FROM jobs q
        WHERE q.status = 'queued' AND q.run_at <= now()
          AND q.executor = ANY (p_executors) AND q.labels <@ p_labels
        ORDER BY q.priority DESC, q.run_at, q.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs j
    SET status = 'claimed', worker_id = p_worker, lease_token = random_lease_token(),
        lease_expires_at = now() + p_lease_ms * interval '1 millisecond', claimed_at = now(),
        heartbeat_at = now()
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.event_id, j.attempt, j.priority, j.run_at, j.lease_token,
              j.lease_expires_at, j.spec, j.input, j.parent_job_id, j.root_job_id, j.last_log_seq;
END
$fn$;
