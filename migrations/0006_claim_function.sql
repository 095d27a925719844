-- The batch claim as a function, so its plan cannot depend on stale statistics.
--
-- The claim must walk `jobs_claim_idx` in order and stop after `p_limit` rows. When the
-- planner believes few jobs are queued (a new table, or a burst of jobs since the last
-- ANALYZE) it prefers a bitmap scan of every queued job followed by a sort: each claim then
-- costs time proportional to the whole queue (3 ms at 5,000 queued jobs, and growing), exactly
-- when the queue is longest. The function's SET clauses apply only while it runs, and
-- PL/pgSQL keeps the plan for the session.
CREATE FUNCTION claim_jobs(p_worker uuid, p_executors text[], p_labels jsonb, p_limit bigint,
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
    SET status = 'claimed', worker_id = p_worker, lease_token = nextval('lease_token_seq'),
        lease_expires_at = now() + p_lease_ms * interval '1 millisecond', claimed_at = now(),
        heartbeat_at = now()
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.event_id, j.attempt, j.priority, j.run_at, j.lease_token,
              j.lease_expires_at, j.spec, j.input, j.parent_job_id, j.root_job_id, j.last_log_seq;
END
$fn$;
