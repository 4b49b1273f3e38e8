-- The router's API keys and its audit log (`fibreflow keys`, `fibreflow serve`).
-- A key is shown once at creation as `ffk_<id>.<secret>`; only a SHA-256 of the secret is stored (the secret is
-- 32 random bytes, so a fast hash cannot be brute-forced). Rotation makes a new key and lets the old one live on
-- until `expires_at` (the overlap window).
CREATE TABLE api_keys (
    id                 text PRIMARY KEY,
    name               text NOT NULL,
    secret_sha256      text NOT NULL,
    scopes             text[] NOT NULL CHECK (scopes <@ ARRAY['chat', 'admin']::text[] AND cardinality(scopes) > 0),
    requests_per_minute integer CHECK (requests_per_minute > 0),
    tokens_per_minute  integer CHECK (tokens_per_minute > 0),
    created_at         timestamptz NOT NULL DEFAULT now(),
    expires_at         timestamptz,
    revoked_at         timestamptz,
    rotated_from       text REFERENCES api_keys (id)
);

-- One row per request the router answered or refused. Never the key; the prompt only when configured.
CREATE TABLE request_audit (
    id                bigserial PRIMARY KEY,
    at                timestamptz NOT NULL,
    key_id            text,
    caller            text NOT NULL,
    endpoint          text NOT NULL,
    model             text,
    arm               text,
    model_version     text,
    status            integer NOT NULL,
    prompt_tokens     integer,
    completion_tokens integer,
    latency_ms        real NOT NULL,
    cache             text,
    error             text,
    prompt            text
);
CREATE INDEX request_audit_at ON request_audit (at);
CREATE INDEX request_audit_key ON request_audit (key_id, at);
