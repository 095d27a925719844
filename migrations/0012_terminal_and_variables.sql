-- Helper B (issue 11): variable write scope per event, and secrets sealed to their identity.

-- What a script of this event may write back (`baton_set_variable`): `event` (default) its
-- event's own variables only; `global` also global ones (created global when new).
ALTER TABLE events ADD COLUMN variables_write text NOT NULL DEFAULT 'event'
    CHECK (variables_write IN ('event', 'global'));

-- Secret values used to be sealed with the row id as associated data. Two concurrent writes of
-- a new key each chose an id; the loser's `ON CONFLICT DO UPDATE` kept the winner's id with
-- the loser's ciphertext, which then never opened. New values are sealed to the variable's
-- identity (scope and key), known before the insert. Rows sealed before this migration keep
-- opening with their id until they are next written.
ALTER TABLE variables ADD COLUMN sealed_to_identity boolean NOT NULL DEFAULT false;
ALTER TABLE variables ALTER COLUMN sealed_to_identity SET DEFAULT true;
