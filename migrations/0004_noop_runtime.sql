-- The `noop` runtime: starts nothing, so it has neither content, command nor request.
-- The unnamed checks of 0001 that name the runtimes are replaced by named ones.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'events'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%runtime%'
    LOOP
        EXECUTE format('ALTER TABLE events DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;

ALTER TABLE events
    ADD CONSTRAINT events_runtime_known
        CHECK (runtime IN ('bash', 'sh', 'python', 'node', 'exec', 'http', 'noop')),
    ADD CONSTRAINT events_command_for_exec CHECK ((runtime = 'exec') = (command IS NOT NULL)),
    ADD CONSTRAINT events_request_for_http CHECK ((runtime = 'http') = (request IS NOT NULL)),
    ADD CONSTRAINT events_content_for_scripts
        CHECK ((runtime IN ('bash', 'sh', 'python', 'node')) = (content IS NOT NULL));
