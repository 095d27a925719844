-- Conditional actions take a CEL `if` over the finished run (issue 15: "complex condition
-- expressions"): the action fires when its trigger holds and the expression is true.
ALTER TABLE event_actions ADD COLUMN if_expr text CHECK (length(if_expr) BETWEEN 1 AND 4096);

-- Schedules and webhooks start either an event's run or a workflow's run.
ALTER TABLE schedules
    ALTER COLUMN event_id DROP NOT NULL,
    ADD COLUMN workflow_id uuid REFERENCES workflows (id) ON DELETE CASCADE,
    ADD CONSTRAINT schedules_one_target CHECK ((event_id IS NULL) <> (workflow_id IS NULL));
CREATE INDEX schedules_by_workflow ON schedules (workflow_id, id) WHERE workflow_id IS NOT NULL;

-- Exactly once for workflows too: one run per schedule and nominal fire time.
ALTER TABLE workflow_runs
    ADD COLUMN schedule_id uuid REFERENCES schedules (id) ON DELETE SET NULL,
    ADD COLUMN scheduled_for timestamptz;
CREATE UNIQUE INDEX workflow_runs_schedule_slot ON workflow_runs (schedule_id, scheduled_for);

ALTER TABLE webhooks
    ALTER COLUMN event_id DROP NOT NULL,
    ADD COLUMN workflow_id uuid REFERENCES workflows (id) ON DELETE CASCADE,
    ADD CONSTRAINT webhooks_one_target CHECK ((event_id IS NULL) <> (workflow_id IS NULL));
CREATE INDEX webhooks_workflow_idx ON webhooks (workflow_id, created_at) WHERE workflow_id IS NOT NULL;

-- Idempotent workflow runs (`POST /workflows/{id}/run` `idempotency_key`, webhook
-- `Idempotency-Key`): one run per workflow and key.
ALTER TABLE workflow_runs ADD COLUMN idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 200);
CREATE UNIQUE INDEX workflow_runs_idempotency ON workflow_runs (workflow_id, idempotency_key);
