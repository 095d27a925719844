-- Worker tokens bound by an admin to the labels and executors their workers may declare.
-- NULL means unbound (a worker may declare anything, as before); `{}` / an empty label set
-- means the worker may declare no labels.
ALTER TABLE api_tokens
    ADD COLUMN worker_labels jsonb CHECK (worker_labels IS NULL OR jsonb_typeof(worker_labels) = 'object'),
    ADD COLUMN worker_executors text[] CHECK (worker_executors IS NULL OR cardinality(worker_executors) > 0),
    ADD CONSTRAINT api_tokens_binding_worker_only
        CHECK (role = 'worker' OR (worker_labels IS NULL AND worker_executors IS NULL));
