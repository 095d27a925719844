-- `baton_job_queued` says whether the job is due now (payload: the executor) or later (the
-- executor and `:later`), so a dispatcher asks the database when the next delayed job is due
-- only after one was queued, not after every job.
CREATE OR REPLACE FUNCTION notify_job_queued() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('baton_job_queued',
                      NEW.executor || CASE WHEN NEW.run_at > now() THEN ':later' ELSE '' END);
    RETURN NULL;
END
$$;
