-- What live A/B comparisons need from the audit log: the arm the split chose even when the fallback answered
-- instead (`arm` then says "fallback"), why the fallback answered, and whether a QA key forced the arm (regression
-- runs: not user traffic).
ALTER TABLE request_audit ADD COLUMN routed_arm text;
ALTER TABLE request_audit ADD COLUMN fallback text;
ALTER TABLE request_audit ADD COLUMN forced boolean NOT NULL DEFAULT false;
CREATE INDEX request_audit_model_at ON request_audit (model, at);
