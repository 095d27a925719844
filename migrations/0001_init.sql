-- Baton's initial schema: events, the job queue and its history, chunked logs, tokens,
-- workers and the audit log. Constraints make invalid states unrepresentable so that a bug in
-- one replica cannot corrupt the queue for the others.

CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    role         text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer', 'worker')),
    -- sha256 of the token: tokens are 256-bit random, so a fast hash is safe at rest.
    token_hash   bytea NOT NULL UNIQUE,
    token_prefix text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE events (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    description     text NOT NULL DEFAULT '',
    runtime         text NOT NULL CHECK (runtime IN ('bash', 'sh', 'python', 'node', 'exec', 'http')),
    content         text,
    command         jsonb,
    request         jsonb,
    executor        text NOT NULL CHECK (executor IN ('container', 'ssh', 'local')),
    server_id       uuid,
    image           text,
    env             jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(env) = 'object'),
    timeout_seconds integer NOT NULL DEFAULT 3600 CHECK (timeout_seconds BETWEEN 1 AND 604800),
    max_attempts    integer NOT NULL DEFAULT 1 CHECK (max_attempts BETWEEN 1 AND 100),
    retry_backoff_seconds integer NOT NULL DEFAULT 10 CHECK (retry_backoff_seconds BETWEEN 0 AND 86400),
    retry_backoff_max_seconds integer NOT NULL DEFAULT 3600 CHECK (retry_backoff_max_seconds BETWEEN 0 AND 604800),
    -- Which failures use up retries: `any` (infrastructure errors, non-zero exits, timeouts) or
    -- `infrastructure` (only failures that were not the script's own).
    retry_on        text NOT NULL DEFAULT 'any' CHECK (retry_on IN ('any', 'infrastructure')),
    -- Container executor: network access (default none) and resource limits within maximums.
    network         boolean NOT NULL DEFAULT false,
    limits          jsonb CHECK (limits IS NULL OR jsonb_typeof(limits) = 'object'),
    priority        integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
    labels          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((runtime = 'exec') = (command IS NOT NULL)),
    CHECK ((runtime = 'http') = (request IS NOT NULL)),
    CHECK ((runtime IN ('exec', 'http')) = (content IS NULL)),
    CHECK (server_id IS NULL OR executor = 'ssh')
);

-- Fencing tokens: every claim takes a fresh value, so a report carrying an older token can
-- always be told apart from the current holder's.
CREATE SEQUENCE lease_token_seq AS bigint;

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    event_id         uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    status           text NOT NULL CHECK (status IN
                       ('queued', 'claimed', 'running', 'succeeded', 'failed', 'timed_out', 'cancelled')),
    priority         integer NOT NULL,
    run_at           timestamptz NOT NULL,
    attempt          integer NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    max_attempts     integer NOT NULL CHECK (max_attempts >= 1),
    -- Requeues caused by a lost lease (worker died) do not count against max_attempts, but are
    -- bounded so a job that kills every worker that runs it cannot loop forever.
    lease_losses     integer NOT NULL DEFAULT 0 CHECK (lease_losses >= 0),
    dead             boolean NOT NULL DEFAULT false,
    idempotency_key  text CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    -- Routing: the executor a worker must offer and labels it must carry (subset match).
    executor         text NOT NULL CHECK (executor IN ('container', 'ssh', 'local')),
    labels           jsonb NOT NULL DEFAULT '{}',
    -- The event definition as it was when the job was queued: editing an event never changes
    -- a run that is already queued or running.
    spec             jsonb NOT NULL,
    input            jsonb NOT NULL DEFAULT '{}',
    output           jsonb,
    condition        boolean,
    progress         smallint CHECK (progress BETWEEN 0 AND 100),
    exit_code        integer,
    exit_signal      integer,
    error_kind       text CHECK (error_kind IN
                       ('script', 'infrastructure', 'timeout', 'cancelled', 'lease_lost', 'output')),
    error_message    text,
    worker_id        uuid,
    lease_token      bigint,
    lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    -- The token under which the completion was recorded: lets a worker that lost the
    -- acknowledgement (api restart) learn that its report landed.
    completed_token  bigint,
    -- Log bookkeeping: lines are stored with contiguous sequence numbers up to last_log_seq
    -- (a re-sent batch is recognised and acknowledged, not stored twice); past the per-job cap
    -- lines are counted, not kept.
    last_log_seq     bigint NOT NULL DEFAULT 0,
    log_bytes        bigint NOT NULL DEFAULT 0,
    log_lines_dropped bigint NOT NULL DEFAULT 0,
    log_bytes_dropped bigint NOT NULL DEFAULT 0,
    parent_job_id    uuid REFERENCES jobs (id) ON DELETE SET NULL,
    root_job_id      uuid NOT NULL,
    depth            integer NOT NULL DEFAULT 0 CHECK (depth >= 0),
    created_by       uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    claimed_at       timestamptz,
    started_at       timestamptz,
    heartbeat_at     timestamptz,
    finished_at      timestamptz,
    UNIQUE (event_id, idempotency_key),
    -- A lease exists exactly while a worker holds the job.
    CHECK ((status IN ('claimed', 'running')) = (lease_token IS NOT NULL)),
    CHECK ((lease_token IS NULL) = (lease_expires_at IS NULL)),
    CHECK (lease_token IS NULL OR worker_id IS NOT NULL),
    -- Finished exactly when terminal.
    CHECK ((status IN ('succeeded', 'failed', 'timed_out', 'cancelled')) = (finished_at IS NOT NULL)),
    CHECK (NOT dead OR status IN ('failed', 'timed_out')),
    CHECK (status <> 'succeeded' OR error_kind IS NULL),
    CHECK ((error_kind IS NULL) = (error_message IS NULL))
);

-- The claim: queued jobs by priority, then due time, then age. Partial, so it stays small
-- however long the history grows.
CREATE INDEX jobs_claim_idx ON jobs (priority DESC, run_at, id) WHERE status = 'queued';
-- The reaper scans only jobs that hold a lease.
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at) WHERE lease_token IS NOT NULL;
CREATE INDEX jobs_event_idx ON jobs (event_id, id DESC);
CREATE INDEX jobs_root_idx ON jobs (root_job_id, id);
CREATE INDEX jobs_status_idx ON jobs (status, id DESC);

-- Logs are stored in chunks (one row per batch of lines a worker sent), never a row per line.
CREATE TABLE job_logs (
    job_id     uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    first_seq  bigint NOT NULL CHECK (first_seq >= 1),
    last_seq   bigint NOT NULL,
    -- A JSON array [{"seq": 1, "stream": "stdout", "text": "...", "ts": "..."}, ...], kept as
    -- text: it is written often and read whole, so PostgreSQL need not parse it.
    lines      text NOT NULL,
    bytes      integer NOT NULL CHECK (bytes >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, first_seq),
    CHECK (last_seq >= first_seq)
);

CREATE TABLE workers (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    -- The api replica whose stream the worker holds (NULL when disconnected).
    api_id        text,
    running       integer NOT NULL DEFAULT 0,
    token_id      uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    labels        jsonb NOT NULL DEFAULT '{}',
    executors     text[] NOT NULL DEFAULT '{}',
    slots         integer NOT NULL DEFAULT 0 CHECK (slots >= 0),
    version       text,
    hostname      text,
    connected_at  timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    disconnected_at timestamptz
);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    token_id    uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at_idx ON audit_log (at DESC);

-- Wake dispatchers on every replica whenever a job becomes runnable (enqueue, retry, reaped
-- lease), in the transaction that made it so: on commit, not before.
CREATE FUNCTION notify_job_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('baton_job_queued', NEW.executor);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_queued
    AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued')
    EXECUTE FUNCTION notify_job_queued();

-- Live log tails on every replica: a pointer (job id and last sequence number), never the text.
CREATE FUNCTION notify_job_logs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('baton_job_logs', NEW.job_id::text || ':' || NEW.last_seq::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER job_logs_notify
    AFTER INSERT ON job_logs
    FOR EACH ROW EXECUTE FUNCTION notify_job_logs();

-- ... and the end of a job, so live tails can close with the final status.
CREATE FUNCTION notify_job_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('baton_job_logs', NEW.id::text || ':done');
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_notify_finished
    AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status IN ('succeeded', 'failed', 'timed_out', 'cancelled') AND OLD.status <> NEW.status)
    EXECUTE FUNCTION notify_job_finished();
