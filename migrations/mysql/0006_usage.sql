-- Usage: what each task used, in columns the usage report sums; the same schema as
-- migrations/sqlite (see there). Model names are kept to 200 characters, as a spec's are.
ALTER TABLE tasks
    ADD COLUMN model VARCHAR(200) NOT NULL DEFAULT '',
    ADD COLUMN prompt_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN completion_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN total_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN cost_usd DOUBLE NOT NULL DEFAULT 0,
    ADD KEY tasks_tenant_created (tenant, created_at);

-- Tasks stored before: their spec's model, then what their summary says. (A JSON null
-- unquotes to the text `null`, hence the type checks.)
UPDATE tasks SET model = LEFT(JSON_UNQUOTE(JSON_EXTRACT(spec, '$.model')), 200)
WHERE JSON_VALID(spec) AND JSON_TYPE(JSON_EXTRACT(spec, '$.model')) = 'STRING';
UPDATE tasks SET
    model = CASE WHEN JSON_TYPE(JSON_EXTRACT(summary, '$.model')) = 'STRING'
                 THEN LEFT(JSON_UNQUOTE(JSON_EXTRACT(summary, '$.model')), 200)
                 ELSE model END,
    prompt_tokens = COALESCE(JSON_EXTRACT(summary, '$.prompt_tokens'), 0),
    completion_tokens = COALESCE(JSON_EXTRACT(summary, '$.completion_tokens'), 0),
    cached_tokens = COALESCE(JSON_EXTRACT(summary, '$.cached_tokens'), 0),
    reasoning_tokens = COALESCE(JSON_EXTRACT(summary, '$.reasoning_tokens'), 0),
    total_tokens = COALESCE(JSON_EXTRACT(summary, '$.total_tokens'), 0),
    cost_usd = COALESCE(JSON_EXTRACT(summary, '$.cost_usd'), 0)
WHERE summary IS NOT NULL AND JSON_VALID(summary);
