-- Variables scripts read and write, conditional actions that chain runs or send messages, and
-- the outbox those messages are delivered from.

CREATE TABLE variables (
    id          uuid PRIMARY KEY,
    key         text NOT NULL CHECK (key ~ '^[A-Za-z0-9_.-]{1,128}$' AND key NOT IN ('.', '..')),
    -- NULL: global; otherwise the event the variable belongs to (scope `event:{id}`).
    event_id    uuid REFERENCES events (id) ON DELETE CASCADE,
    secret      boolean NOT NULL DEFAULT false,
    -- Plain values in `value`; secret ones only sealed (XChaCha20-Poly1305, bound to the row id).
    value       text,
    sealed      bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- Who wrote it last: a token (API) or a job (script).
    updated_by_token uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    updated_by_job   uuid,
    UNIQUE NULLS NOT DISTINCT (key, event_id),
    CHECK (secret = (sealed IS NOT NULL)),
    CHECK (secret = (value IS NULL))
);

CREATE TABLE event_actions (
    id              uuid PRIMARY KEY,
    event_id        uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    trigger         text NOT NULL CHECK (trigger IN ('on_success', 'on_failure', 'always', 'on_condition')),
    delay_seconds   integer NOT NULL DEFAULT 0 CHECK (delay_seconds BETWEEN 0 AND 2592000),
    -- {"type": "run_event", "event_id": ...} or
    -- {"type": "send_message", "channel": ..., "target": ..., "template": ..., "subject": ...}
    action          jsonb NOT NULL CHECK (action->>'type' IN ('run_event', 'send_message')),
    -- For run_event: deleting the target event deletes the action.
    target_event_id uuid REFERENCES events (id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((action->>'type' = 'run_event') = (target_event_id IS NOT NULL))
);
CREATE INDEX event_actions_event_idx ON event_actions (event_id, created_at);

-- Why a completion's actions did not all run (e.g. the chain depth limit), for the job view.
ALTER TABLE jobs ADD COLUMN action_notes text[] NOT NULL DEFAULT '{}';

CREATE TABLE message_outbox (
    id              uuid PRIMARY KEY,
    job_id          uuid REFERENCES jobs (id) ON DELETE SET NULL,
    action_id       uuid REFERENCES event_actions (id) ON DELETE SET NULL,
    channel         text NOT NULL CHECK (channel IN ('webhook', 'slack', 'discord', 'email')),
    target          text NOT NULL,
    subject         text NOT NULL DEFAULT '',
    -- Rendered when the completion was recorded, so later edits cannot change what is sent.
    body            text NOT NULL,
    -- The job and event as JSON, for webhook payloads.
    payload         jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    max_attempts    integer NOT NULL DEFAULT 10,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- A replica delivering the message holds it until then (so two never send it at once).
    locked_until    timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz
);
CREATE INDEX message_outbox_due_idx ON message_outbox (next_attempt_at) WHERE status = 'pending';

CREATE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('baton_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER message_outbox_notify
    AFTER INSERT ON message_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox();
