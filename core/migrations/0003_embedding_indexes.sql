-- Which embedding space each vector table holds. `fibreflow embed` refuses to write or query a table with
-- another model, revision or dimension (mixing vector spaces silently breaks retrieval).
CREATE TABLE embedding_indexes (
    table_name     text PRIMARY KEY,
    model_name     text NOT NULL,
    model_revision text NOT NULL,
    dim            integer NOT NULL CHECK (dim > 0),
    created_at     timestamptz NOT NULL DEFAULT now()
);
