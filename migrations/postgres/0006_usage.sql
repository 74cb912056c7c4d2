-- Usage: what each task used, in columns the usage report sums; the same schema as
-- migrations/sqlite (see there).
ALTER TABLE tasks
    ADD COLUMN IF NOT EXISTS model TEXT NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS prompt_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS completion_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cached_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS total_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS tasks_tenant_created ON tasks (tenant, created_at);

-- Tasks stored before: their spec's model, then what their summary says. A stored JSON
-- text may hold an escaped NUL (`\u0000`), which PostgreSQL refuses to read: it is read
-- as U+FFFD, as the store writes a NUL in a message.
UPDATE tasks SET model = COALESCE(replace(spec, '\u0000', '\ufffd')::json ->> 'model', '');
UPDATE tasks SET
    model = COALESCE(s.j ->> 'model', tasks.model),
    prompt_tokens = COALESCE((s.j ->> 'prompt_tokens')::BIGINT, 0),
    completion_tokens = COALESCE((s.j ->> 'completion_tokens')::BIGINT, 0),
    cached_tokens = COALESCE((s.j ->> 'cached_tokens')::BIGINT, 0),
    reasoning_tokens = COALESCE((s.j ->> 'reasoning_tokens')::BIGINT, 0),
    total_tokens = COALESCE((s.j ->> 'total_tokens')::BIGINT, 0),
    cost_usd = COALESCE((s.j ->> 'cost_usd')::DOUBLE PRECISION, 0)
FROM (
    SELECT task_id, replace(summary, '\u0000', '\ufffd')::json AS j
    FROM tasks WHERE summary IS NOT NULL
) AS s
WHERE tasks.task_id = s.task_id;
