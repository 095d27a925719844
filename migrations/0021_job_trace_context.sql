-- A job's trace context (W3C `traceparent` text), set when it is queued: the REST handler's
-- span (a child of the client's `traceparent` header when one came), the schedule's or the
-- webhook's, or for a chained job the span of its parent's completion. Dispatch on any
-- replica, retries and chains continue that trace: the claim returns it, the assignment
-- carries it to the worker, the script gets it as `TRACEPARENT`. NULL when the job was queued
-- with no trace (no exporter and no incoming context).
ALTER TABLE jobs ADD COLUMN trace_context text;

-- The claim also returns the trace context (the return type changes: drop and re-create).
DROP FUNCTION claim_jobs(uuid, text[], jsonb, bigint, bigint);

CREATE FUNCTION claim_jobs(p_worker uuid, p_executors text[], p_labels jsonb, p_limit bigint,
                           p_lease_ms bigint)
RETURNS TABLE (id uuid, event_id uuid, attempt int, priority int, run_at timestamptz,
               lease_token bigint, lease_expires_at timestamptz, spec jsonb, input jsonb,
               parent_job_id uuid, root_job_id uuid, last_log_seq bigint, trace_context text)
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
              j.lease_expires_at, j.spec, j.input, j.parent_job_id, j.root_job_id, j.last_log_seq,
              j.trace_context;
END
$fn$;
