-- Workflows (issue 15): DAGs of steps, each running an event.
--
-- A run's steps live in `workflow_steps`, changed only by a transaction holding the run's row
-- lock (`SELECT … FROM workflow_runs … FOR UPDATE`): a step's completion, the start of the
-- steps it unblocks, cancel and retry. The jobs a run creates are unique per (run, step,
-- item, attempt): a decision taken twice cannot queue a step twice.

CREATE TABLE workflows (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    definition  jsonb NOT NULL,
    revision    bigint NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workflow_runs (
    id                 uuid PRIMARY KEY,
    workflow_id        uuid NOT NULL REFERENCES workflows (id) ON DELETE CASCADE,
    workflow_name      text NOT NULL,
    -- The definition the run follows, taken when it started.
    definition         jsonb NOT NULL,
    status             text NOT NULL CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    input              jsonb NOT NULL,
    -- 1, then +1 per retry; a step's jobs carry the attempt that started them.
    attempt            integer NOT NULL DEFAULT 1,
    on_failure_job_id  uuid,
    created_by         uuid,
    created_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);
CREATE INDEX workflow_runs_by_workflow ON workflow_runs (workflow_id, id DESC);

CREATE TABLE workflow_steps (
    run_id       uuid NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE,
    step_id      text NOT NULL,
    -- Definition order, for display.
    position     integer NOT NULL,
    status       text NOT NULL CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'skipped', 'cancelled')),
    skip_reason  text CHECK (skip_reason IN ('condition', 'when', 'upstream_failed', 'upstream_skipped', 'stop_on_error')),
    error        text,
    attempt      integer NOT NULL DEFAULT 0,
    -- for_each: the list the step runs over, and the next element to start.
    items        jsonb,
    next_item    integer NOT NULL DEFAULT 0,
    output       jsonb,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (run_id, step_id)
);

ALTER TABLE jobs
    ADD COLUMN workflow_run_id uuid REFERENCES workflow_runs (id) ON DELETE SET NULL,
    ADD COLUMN step_id text,
    ADD COLUMN step_item integer,
    ADD COLUMN step_attempt integer;

-- At most one job per (run, step, item, attempt): the engine inserts with ON CONFLICT DO
-- NOTHING, so whatever decides twice queues once. Also finds a run's jobs.
CREATE UNIQUE INDEX jobs_workflow_step ON jobs (workflow_run_id, step_id, step_item, step_attempt)
    NULLS NOT DISTINCT WHERE workflow_run_id IS NOT NULL;
