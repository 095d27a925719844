-- Schedules: an event run on its own, by cron (in a time zone) or every N seconds.
-- Any replica fires any schedule: it locks due rows (FOR UPDATE SKIP LOCKED), inserts their
-- jobs and advances next_fire_at in one transaction; the unique (schedule_id, scheduled_for)
-- index below makes a second job for the same nominal fire time impossible.
CREATE TABLE schedules (
    id               uuid PRIMARY KEY,
    event_id         uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    cron             text CHECK (length(cron) BETWEEN 1 AND 256),
    interval_seconds bigint CHECK (interval_seconds >= 1),
    timezone         text NOT NULL DEFAULT 'UTC',
    missed           text NOT NULL DEFAULT 'last' CHECK (missed IN ('none', 'last', 'all')),
    max_catch_up     integer NOT NULL DEFAULT 100 CHECK (max_catch_up >= 1),
    jitter_seconds   integer NOT NULL DEFAULT 0 CHECK (jitter_seconds >= 0),
    start_at         timestamptz,
    end_at           timestamptz,
    input            jsonb NOT NULL DEFAULT '{}',
    paused           boolean NOT NULL DEFAULT false,
    -- Interval slots count from here (start_at, or the creation time).
    anchor_at        timestamptz NOT NULL,
    -- The next nominal fire time not yet fired (NULL: the schedule has ended).
    next_fire_at     timestamptz,
    -- next_fire_at plus the schedule's jitter: when a replica fires it.
    next_due_at      timestamptz,
    -- The nominal time of the last slot fired.
    last_fired_at    timestamptz,
    created_by       uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    revision         bigint NOT NULL DEFAULT 1,
    CHECK ((cron IS NULL) <> (interval_seconds IS NULL)),
    CHECK (end_at IS NULL OR start_at IS NULL OR end_at > start_at)
);

CREATE INDEX schedules_due ON schedules (next_due_at) WHERE NOT paused AND next_due_at IS NOT NULL;
CREATE INDEX schedules_by_event ON schedules (event_id, id);

ALTER TABLE jobs
    ADD COLUMN schedule_id   uuid REFERENCES schedules (id) ON DELETE SET NULL,
    ADD COLUMN scheduled_for timestamptz,
    ADD CONSTRAINT jobs_schedule_slot_pair CHECK ((schedule_id IS NULL) OR (scheduled_for IS NOT NULL));

-- Exactly once: one job per schedule and nominal fire time.
CREATE UNIQUE INDEX jobs_schedule_slot ON jobs (schedule_id, scheduled_for);
