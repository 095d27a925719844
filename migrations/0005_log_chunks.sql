-- Job output stored in the compact binary encoding workers send (`baton_proto::logchunk`):
-- the api stores a batch as it came instead of re-encoding it as JSON, line by line.
--
-- New rows fill `chunk`; rows written before keep their JSON `lines` (readers decode both).
-- STORAGE EXTERNAL: chunks are written once, read rarely and whole, and pglz compressing each
-- one was most of the database's time for a flood of output; TOAST still moves large chunks
-- out of line, just uncompressed.
ALTER TABLE job_logs ALTER COLUMN lines DROP NOT NULL;
ALTER TABLE job_logs ADD COLUMN chunk bytea;
ALTER TABLE job_logs ALTER COLUMN chunk SET STORAGE EXTERNAL;
ALTER TABLE job_logs ADD CONSTRAINT job_logs_one_format CHECK ((lines IS NULL) <> (chunk IS NULL));
