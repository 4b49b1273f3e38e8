-- The retrieval corpus: every record rendered to one text, with the metadata that retrieval filters on.
-- Used by `fibreflow embed` (hash per record for incremental embedding) and as grounded-QA contexts.
CREATE VIEW fibreflow_corpus AS
WITH pole_counts AS (
    SELECT project_id, sum(n) AS total, string_agg(status || ' ' || n, ', ' ORDER BY status) AS by_status
    FROM (SELECT project_id, status, count(*) AS n FROM poles GROUP BY project_id, status) s
    GROUP BY project_id
)
SELECT 'project:' || p.id AS record_id, 'project' AS record_type, p.id AS project_id, p.region,
       p.start_date AS record_date,
       format('Project %s "%s" for client %s in %s, %s (%s). Network %s, %s build. Status: %s. '
              'Project manager %s. Start %s, target end %s. Homes planned %s. Budget R %s. '
              'Poles: %s in total (%s).',
              p.id, p.name, p.client, p.town, p.municipality, p.region, p.network_type, p.build_method,
              p.status, p.project_manager, p.start_date, p.target_end_date, p.homes_planned,
              to_char(p.budget_zar, 'FM999,999,999,990.00'),
              coalesce(pc.total, 0), coalesce(pc.by_status, 'none')) AS content
FROM projects p LEFT JOIN pole_counts pc ON pc.project_id = p.id
UNION ALL
SELECT 'task:' || t.id, 'task', t.project_id, p.region, t.due_date,
       format('Task %s on project %s (%s), phase %s: %s. Status: %s. Assigned to %s. Due %s.%s',
              t.id, p.id, p.name, t.phase, t.title, t.status, coalesce(t.assignee, 'nobody'), t.due_date,
              CASE WHEN t.completed_on IS NULL THEN '' ELSE ' Completed ' || t.completed_on || '.' END)
FROM tasks t JOIN projects p ON p.id = t.project_id
UNION ALL
SELECT 'boq_item:' || b.id, 'boq_item', b.project_id, p.region, NULL::date,
       format('BOQ line %s on project %s (%s): %s. Quantity %s %s at R %s per %s = R %s.',
              b.item_code, p.id, p.name, b.description, b.quantity, b.unit,
              to_char(b.rate_zar, 'FM999,999,990.00'), b.unit,
              to_char(b.quantity * b.rate_zar, 'FM999,999,999,990.00'))
FROM boq_items b JOIN projects p ON p.id = b.project_id
UNION ALL
SELECT 'pole:' || o.id, 'pole', o.project_id, p.region, o.planted_on,
       format('Pole %s on project %s (%s), %s on %s at %s, %s. Type %s. Status: %s.%s',
              o.pole_number, p.id, p.name, p.town, coalesce(o.street, 'unnamed street'),
              round(o.latitude::numeric, 6), round(o.longitude::numeric, 6), o.pole_type, o.status,
              CASE WHEN o.planted_on IS NULL THEN '' ELSE ' Planted ' || o.planted_on || '.' END)
FROM poles o JOIN projects p ON p.id = o.project_id
UNION ALL
SELECT 'daily_progress:' || d.id, 'daily_progress', d.project_id, p.region, d.report_date,
       format('Daily progress %s on project %s (%s): crew %s, %s %s %s.%s',
              d.report_date, p.id, p.name, d.crew, d.activity, d.quantity, d.unit,
              CASE WHEN d.notes IS NULL THEN '' ELSE ' Notes: ' || d.notes END)
FROM daily_progress d JOIN projects p ON p.id = d.project_id
UNION ALL
SELECT 'glossary:' || g.term, 'glossary', NULL, NULL, NULL::date,
       format('%s (%s)%s: %s', g.term, replace(g.category, '_', ' '),
              CASE WHEN cardinality(g.aliases) = 0 THEN ''
                   ELSE ', also called ' || array_to_string(g.aliases, ', ') END,
              g.definition)
FROM glossary g;
