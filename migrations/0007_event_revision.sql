-- Every change to an event's definition gets a new revision. An enqueue names the revision it
-- snapshots and inserts only if the event is still at it, so a replica may keep events in
-- memory (one statement per run instead of two) and never queue a job from a replaced
-- definition.
ALTER TABLE events ADD COLUMN revision bigint NOT NULL DEFAULT 1;
