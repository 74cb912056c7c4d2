-- Usage: what each task used, in columns the usage report (`GET /api/usage`) sums per day,
-- tenant and model. Written with the summary (each write replaces the last: a retried task
-- counts its latest attempt); `model` is the spec's until a summary names the one that ran
-- ('' when the spec names none: the report counts those under the configured default).
ALTER TABLE tasks ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN completion_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN total_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN cost_usd REAL NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS tasks_tenant_created ON tasks (tenant, created_at);

-- Tasks stored before: their spec's model, then what their summary says.
UPDATE tasks SET model = COALESCE(json_extract(spec, '$.model'), '')
WHERE json_valid(spec);
UPDATE tasks SET
    model = COALESCE(json_extract(summary, '$.model'), model),
    prompt_tokens = COALESCE(json_extract(summary, '$.prompt_tokens'), 0),
    completion_tokens = COALESCE(json_extract(summary, '$.completion_tokens'), 0),
    cached_tokens = COALESCE(json_extract(summary, '$.cached_tokens'), 0),
    reasoning_tokens = COALESCE(json_extract(summary, '$.reasoning_tokens'), 0),
    total_tokens = COALESCE(json_extract(summary, '$.total_tokens'), 0),
    cost_usd = COALESCE(json_extract(summary, '$.cost_usd'), 0)
WHERE summary IS NOT NULL AND json_valid(summary);
