-- FibreFlow operational data, as held in the company's Supabase (public schema).
CREATE TABLE projects (
    id              text PRIMARY KEY,                -- e.g. PRJ-0001
    name            text NOT NULL,
    client          text NOT NULL,                   -- the fibre network operator (FNO)
    region          text NOT NULL,                   -- province
    municipality    text NOT NULL,
    town            text NOT NULL,
    network_type    text NOT NULL CHECK (network_type IN ('FTTH', 'FTTB', 'backbone')),
    build_method    text NOT NULL CHECK (build_method IN ('underground', 'aerial', 'mixed')),
    status          text NOT NULL CHECK (status IN ('planning', 'permits', 'in_progress', 'on_hold', 'completed')),
    project_manager text NOT NULL,
    start_date      date NOT NULL,
    target_end_date date NOT NULL,
    homes_planned   integer NOT NULL CHECK (homes_planned >= 0),
    budget_zar      numeric(14, 2) NOT NULL,
    updated_at      timestamptz NOT NULL,
    CHECK (target_end_date >= start_date)
);

CREATE TABLE tasks (
    id           bigint PRIMARY KEY,
    project_id   text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    phase        text NOT NULL,
    title        text NOT NULL,
    status       text NOT NULL CHECK (status IN ('todo', 'in_progress', 'blocked', 'done')),
    assignee     text,
    due_date     date NOT NULL,
    completed_on date,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX tasks_project_idx ON tasks (project_id);

CREATE TABLE boq_items (
    id          bigint PRIMARY KEY,
    project_id  text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    item_code   text NOT NULL,
    description text NOT NULL,
    unit        text NOT NULL,
    quantity    numeric(12, 2) NOT NULL CHECK (quantity >= 0),
    rate_zar    numeric(12, 2) NOT NULL CHECK (rate_zar >= 0),
    updated_at  timestamptz NOT NULL,
    UNIQUE (project_id, item_code)
);

CREATE TABLE poles (
    id           bigint PRIMARY KEY,
    project_id   text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    pole_number  text NOT NULL UNIQUE,
    latitude     double precision NOT NULL CHECK (latitude BETWEEN -90 AND 90),
    longitude    double precision NOT NULL CHECK (longitude BETWEEN -180 AND 180),
    pole_type    text NOT NULL,
    status       text NOT NULL CHECK (status IN ('planned', 'permission_pending', 'permission_granted',
                                                 'planted', 'dressed', 'rejected')),
    street       text,
    planted_on   date,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX poles_project_status_idx ON poles (project_id, status);

CREATE TABLE daily_progress (
    id          bigint PRIMARY KEY,
    project_id  text NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    report_date date NOT NULL,
    crew        text NOT NULL,
    activity    text NOT NULL,
    quantity    numeric(10, 2) NOT NULL CHECK (quantity >= 0),
    unit        text NOT NULL,
    notes       text,
    updated_at  timestamptz NOT NULL,
    UNIQUE (project_id, report_date, activity, crew)
);

CREATE TABLE glossary (
    term       text PRIMARY KEY,
    category   text NOT NULL,
    definition text NOT NULL,
    aliases    text[] NOT NULL DEFAULT '{}'
);

-- What produced the current data (the seed's scale/seed/as-of date, or 'supabase-sync'): recorded in manifests.
CREATE TABLE fibreflow_meta (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);
