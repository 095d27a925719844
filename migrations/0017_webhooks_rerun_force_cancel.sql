-- Webhook triggers, reruns and forced cancels (issue 12).

-- A webhook starts runs of its event from `POST /hooks/{key}` without a bearer token. The key
-- is shown once and stored as its SHA-256 (like API tokens); the optional signing secret is
-- sealed with the vault, bound to `baton.webhook/{id}`.
CREATE TABLE webhooks (
    id             uuid PRIMARY KEY,
    event_id       uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    name           text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    key_hash       bytea NOT NULL UNIQUE,
    key_prefix     text NOT NULL,
    signing_secret bytea,
    -- Request headers (lower-cased names) passed to the run as `input._headers`.
    headers        text[] NOT NULL DEFAULT '{}',
    created_by     uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);
CREATE INDEX webhooks_event_idx ON webhooks (event_id, created_at);

-- `POST /jobs/{id}/rerun`: the job a rerun copies.
ALTER TABLE jobs ADD COLUMN rerun_of uuid REFERENCES jobs (id) ON DELETE SET NULL;
-- `POST /jobs/{id}/cancel?force=true`: the worker kills the run at once (no SIGTERM grace).
ALTER TABLE jobs ADD COLUMN cancel_force boolean NOT NULL DEFAULT false;
