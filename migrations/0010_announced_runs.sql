-- Runs queued through the REST API are announced by the replica that queued them: one
-- `NOTIFY baton_job_queued` per burst (api/src/announce.rs) instead of one per job, because
-- PostgreSQL serialises notifying commits and they bounded the enqueue rate. Such an insert
-- sets `baton.announced` for its own transaction; every other way a job becomes queued
-- (chained runs, retries, reaped jobs, other clients) still notifies from this trigger.
DROP TRIGGER jobs_notify_queued ON jobs;
CREATE TRIGGER jobs_notify_queued
    AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued'
                       AND current_setting('baton.announced', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION notify_job_queued();
