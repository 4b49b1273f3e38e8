-- Scopes for QA (forcing an arm, regression runs) and for scraping metrics.
ALTER TABLE api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scopes_check
    CHECK (scopes <@ ARRAY['chat', 'admin', 'qa', 'metrics']::text[] AND cardinality(scopes) > 0);

-- Every audit row names the response it answered with (feedback joins on it).
ALTER TABLE request_audit ADD COLUMN response_id text;
CREATE INDEX request_audit_response ON request_audit (response_id) WHERE response_id IS NOT NULL;

-- Feedback on a response: one vote per response and caller (a later vote replaces the earlier one).
CREATE TABLE feedback (
    response_id   text NOT NULL,
    caller        text NOT NULL,   -- the API key id that voted
    arm           text NOT NULL,
    model_version text NOT NULL,
    score         real NOT NULL CHECK (score >= 0 AND score <= 1),  -- thumbs up = 1, down = 0
    thumbs        text CHECK (thumbs IN ('up', 'down')),
    comment       text,
    at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (response_id, caller)
);
CREATE INDEX feedback_at ON feedback (at);

-- Experiments changed through the admin API, shared by every router and kept across restarts. A row overrides
-- the experiment of the same model in serving.yaml; `spec` NULL means the experiment was removed.
CREATE TABLE router_experiments (
    model      text PRIMARY KEY,
    spec       jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text
);
