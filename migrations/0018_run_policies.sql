-- Run policies of events (issue 12): concurrency groups, stuck detection, startup window.

ALTER TABLE events
    -- {"max": N, "key": "<template>", "strategy": "queue" | "skip" | "cancel_previous"}
    ADD COLUMN concurrency jsonb CHECK (concurrency IS NULL OR jsonb_typeof(concurrency) = 'object'),
    ADD COLUMN stuck_after_seconds integer CHECK (stuck_after_seconds BETWEEN 1 AND 604800),
    ADD COLUMN startup_window_seconds integer NOT NULL DEFAULT 5
        CHECK (startup_window_seconds BETWEEN 0 AND 3600);

ALTER TABLE jobs
    -- The run's concurrency group within its event (the key rendered at enqueue; '' is the
    -- shared group) and the group's limit, both NULL for events without a policy.
    ADD COLUMN concurrency_key text,
    ADD COLUMN concurrency_max integer CHECK (concurrency_max >= 1),
    ADD CONSTRAINT jobs_concurrency_pair CHECK ((concurrency_key IS NULL) = (concurrency_max IS NULL)),
    -- Stuck detection: the last sign of life of the run (start, log batch, progress), written
    -- by the statements that record those anyway (no extra write), and the flag the reaper sets.
    ADD COLUMN active_at timestamptz,
    ADD COLUMN stuck boolean NOT NULL DEFAULT false,
    -- The run exited non-zero within its event's startup window.
    ADD COLUMN start_failure boolean NOT NULL DEFAULT false;

-- `concurrency` joins the error kinds (a run skipped or cancelled by its group's policy).
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'jobs'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%lease_lost%'
    LOOP
        EXECUTE format('ALTER TABLE jobs DROP CONSTRAINT %I', c.conname);
    END LOOP;
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'event_actions'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%on_condition%'
    LOOP
        EXECUTE format('ALTER TABLE event_actions DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;
ALTER TABLE jobs ADD CONSTRAINT jobs_error_kind_known CHECK (error_kind IN
    ('script', 'infrastructure', 'timeout', 'cancelled', 'lease_lost', 'output', 'concurrency'));
ALTER TABLE event_actions ADD CONSTRAINT event_actions_trigger_known CHECK (trigger IN
    ('on_success', 'on_failure', 'always', 'on_condition', 'on_stuck'));

-- A group's claimed and running runs (the claim counts them; admission adds the queued ones
-- from the next index).
CREATE INDEX jobs_concurrency_active ON jobs (event_id, concurrency_key)
    WHERE concurrency_key IS NOT NULL AND status IN ('claimed', 'running');
-- Queued runs with a policy, per group in claim order: the claim finds each group's head with
-- one probe (a loose index scan), however many runs of full groups wait.
CREATE INDEX jobs_concurrency_queued ON jobs (event_id, concurrency_key, priority DESC, run_at, id)
    WHERE concurrency_key IS NOT NULL AND status = 'queued';
-- The plain claim index now holds only runs without a policy, so runs waiting for a full
-- group are never walked by the claim of other jobs.
DROP INDEX jobs_claim_idx;
CREATE INDEX jobs_claim_idx ON jobs (priority DESC, run_at, id)
    WHERE status = 'queued' AND concurrency_key IS NULL;

-- The claim, now keeping every concurrency group within its `max`.
--
-- Plain path (no run with a policy is queued): the statement of migrations 0006/0011 over
-- `jobs_claim_idx`, which now holds only runs without a policy (one probe of the empty
-- partial index `jobs_concurrency_queued` is added), so the throughput of events without a
-- policy does not change.
--
-- Policy path: the groups with queued runs are visited one index probe each (a loose scan of
-- `jobs_concurrency_queued`, so runs waiting in full groups cost nothing). For each group the
-- claimer takes the group's transaction-level advisory lock with `pg_try_advisory_xact_lock`
-- (never waiting: two claimers visiting groups in different orders could otherwise
-- deadlock), counts the group's claimed and running jobs with a fresh snapshot (READ
-- COMMITTED: each statement of the function sees what committed before it; the lock is
-- released only after the holder's commit is visible, so the next holder counts its claims),
-- and takes the group's first `max - active` due runs as candidates. A group whose lock is
-- held by another claimer is passed over, and the claim then sends `NOTIFY baton_job_queued`
-- (delivered at its commit) so the dispatchers look again once that claimer is done. The
-- candidates and the first `p_limit` plain runs are merged in claim order (priority, run_at,
-- id) and the first `p_limit` of them claimed, each `FOR UPDATE SKIP LOCKED`.
CREATE OR REPLACE FUNCTION claim_jobs(p_worker uuid, p_executors text[], p_labels jsonb, p_limit bigint,
                                      p_lease_ms bigint)
RETURNS TABLE (id uuid, event_id uuid, attempt int, priority int, run_at timestamptz,
               lease_token bigint, lease_expires_at timestamptz, spec jsonb, input jsonb,
               parent_job_id uuid, root_job_id uuid, last_log_seq bigint)
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
                  j.lease_expires_at, j.spec, j.input, j.parent_job_id, j.root_job_id, j.last_log_seq;
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
              j.lease_expires_at, j.spec, j.input, j.parent_job_id, j.root_job_id, j.last_log_seq;

    IF contended IS NOT NULL THEN
        PERFORM pg_notify('baton_job_queued', contended);
    END IF;
END
$fn$;

-- A run of a group that stops holding a slot (finished, cancelled, requeued) wakes the
-- dispatchers of every replica when its group has runs waiting, so the next one is claimed
-- at once wherever a worker is free.
CREATE FUNCTION notify_group_slot_freed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM jobs q WHERE q.event_id = NEW.event_id
               AND q.concurrency_key = NEW.concurrency_key AND q.status = 'queued') THEN
        PERFORM pg_notify('baton_job_queued', NEW.executor);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_group_slot_freed
    AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.concurrency_key IS NOT NULL AND OLD.status IN ('claimed', 'running')
                       AND NEW.status NOT IN ('claimed', 'running'))
    EXECUTE FUNCTION notify_group_slot_freed();
