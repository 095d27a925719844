-- Servers that ssh events run on. Credentials are encrypted at rest by the api
-- (XChaCha20-Poly1305 under BATON_MASTER_KEY, bound to the row id) and never returned.
CREATE TABLE servers (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    host            text NOT NULL CHECK (length(host) BETWEEN 1 AND 255),
    port            integer NOT NULL DEFAULT 22 CHECK (port BETWEEN 1 AND 65535),
    username        text NOT NULL CHECK (length(username) BETWEEN 1 AND 64),
    auth_method     text NOT NULL CHECK (auth_method IN ('private_key', 'password')),
    -- nonce ‖ ciphertext of {"private_key": "...", "passphrase": "..."} or {"password": "..."}
    credentials     bytea NOT NULL,
    host_key_policy text NOT NULL CHECK (host_key_policy IN ('strict', 'accept_new')),
    -- The pinned key, an OpenSSH public key line ("ssh-ed25519 AAAA..."). With accept_new it is
    -- recorded on first use and enforced from then on.
    host_key        text,
    host_key_recorded_at timestamptz,
    max_concurrent  integer NOT NULL DEFAULT 4 CHECK (max_concurrent BETWEEN 1 AND 1024),
    labels          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (host_key_policy = 'accept_new' OR host_key IS NOT NULL)
);

ALTER TABLE events
    ADD CONSTRAINT events_server_fk FOREIGN KEY (server_id) REFERENCES servers (id) ON DELETE RESTRICT;
