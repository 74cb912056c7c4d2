-- The worker that ran each attempt's agent (its Temporal identity, `patchflow@host:pid`),
-- NULL until one did.
ALTER TABLE task_attempts ADD COLUMN worker TEXT;
