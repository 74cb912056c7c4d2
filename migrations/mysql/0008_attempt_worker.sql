-- The worker that ran each attempt's agent (its Temporal identity, `patchflow@host:pid`),
-- NULL until one did; the same schema as migrations/sqlite.
ALTER TABLE task_attempts ADD COLUMN worker TEXT NULL;
