-- A job's trace context (W3C `traceparent` text), set when it is queued: the REST handler's
-- span (a child of the client's `traceparent` header when one came), the schedule's or the
-- webhook's, or for a chained job the span of its parent's completion. Dispatch on any
-- replica, retries and chains continue that trace: the claim returns it, the assignment
-- carries it to the worker, the script gets it as `TRACEPARENT`. NULL when the job was queued
-- with no trace (no exporter and no incoming context).
ALTER TABLE jobs ADD COLUMN trace_context text;

-- The claim also returns the trace context (the return type changes: drop and re-create).
-- The body is the run-policy claim of migration 0018, unchanged but for that column.
DROP FUNCTION claim_jobs(uuid, text[], jsonb, bigint, bigint);

CREATE FUNCTION claim_jobs(p_worker uuid, p_executors text[], p_labels jsonb, p_limit bigint,
                                      p_lease_ms bigint)
RETURNS TABLE (id uuid, event_id uuid, attempt int, priority int, run_at timestamptz,
               lease_token bigint, lease_expires_at timestamptz, spec jsonb, input jsonb,
               parent_job_id uuid, root_job_id uuid, last_log_seq bigint, trace_context text)
LANGUAGE plpgsql
SET enable_bitmapscan = off
SET enable_sort = off
-- The merge below sorts a few rows; with sorts disabled their cost looks huge, which would
-- make PostgreSQL JIT-compile the statement (hundreds of ms) for nothing.
SET jit = off
AS $fn$
DECLARE
    g_event uuid;
    g_key text;
    g_max int;
    g_executor text;
    active bigint;
    candidates uuid[] := '{}';
    chosen uuid[];
    contended text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM jobs w WHERE w.concurrency_key IS NOT NULL AND w.status = 'queued') THEN
        RETURN QUERY
        WITH picked AS (
            SELECT q.id FROM jobs q
            WHERE q.status = 'queued' AND q.concurrency_key IS NULL AND q.run_at <= now()
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
        RETURN;
    END IF;

    -- Each group with queued runs, one probe per group.
    SELECT q.event_id, q.concurrency_key, q.concurrency_max, q.executor
    INTO g_event, g_key, g_max, g_executor
    FROM jobs q WHERE q.concurrency_key IS NOT NULL AND q.status = 'queued'
    ORDER BY q.event_id, q.concurrency_key LIMIT 1;
    WHILE g_event IS NOT NULL LOOP
        IF g_executor = ANY (p_executors) THEN
            IF pg_try_advisory_xact_lock(hashtextextended('baton.concurrency/' || g_event::text || '/' || g_key, 0)) THEN
                SELECT count(*) INTO active FROM jobs a
                WHERE a.event_id = g_event AND a.concurrency_key = g_key
                  AND a.status IN ('claimed', 'running');
                IF active < g_max THEN
                    candidates := candidates || ARRAY(
                        SELECT q.id FROM jobs q
                        WHERE q.event_id = g_event AND q.concurrency_key = g_key
                          AND q.status = 'queued' AND q.run_at <= now()
                          AND q.executor = ANY (p_executors) AND q.labels <@ p_labels
                        ORDER BY q.priority DESC, q.run_at, q.id
                        LIMIT least(g_max - active, p_limit));
                END IF;
            ELSE
                contended := g_executor;
            END IF;
        END IF;
        -- The next group.
        SELECT q.event_id, q.concurrency_key, q.concurrency_max, q.executor
        INTO g_event, g_key, g_max, g_executor
        FROM jobs q WHERE q.concurrency_key IS NOT NULL AND q.status = 'queued'
          AND (q.event_id, q.concurrency_key) > (g_event, g_key)
        ORDER BY q.event_id, q.concurrency_key LIMIT 1;
        IF NOT FOUND THEN
            g_event := NULL;
        END IF;
    END LOOP;

    -- The candidates and the plain runs, merged in claim order.
    chosen := ARRAY(
        SELECT m.id FROM (
            SELECT q.id, q.priority, q.run_at FROM jobs q WHERE q.id = ANY (candidates)
            UNION ALL
            (SELECT q.id, q.priority, q.run_at FROM jobs q
             WHERE q.status = 'queued' AND q.concurrency_key IS NULL AND q.run_at <= now()
               AND q.executor = ANY (p_executors) AND q.labels <@ p_labels
             ORDER BY q.priority DESC, q.run_at, q.id
             LIMIT p_limit)
        ) m
        ORDER BY m.priority DESC, m.run_at, m.id
        LIMIT p_limit);

    RETURN QUERY
    WITH picked AS (
        SELECT q.id FROM jobs q
        WHERE q.id = ANY (chosen) AND q.status = 'queued'
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

    IF contended IS NOT NULL THEN
        PERFORM pg_notify('baton_job_queued', contended);
    END IF;
END
$fn$;
