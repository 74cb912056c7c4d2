-- Attempts: each run of a task's workflow (the first, a retry, a reset done in Temporal),
-- numbered from 1 and kept with its outcome. `tasks.attempt` is the current one; `run_id`
-- is the Temporal run that carries an attempt, which tells a new run's first write (a new
-- attempt) from a late write of an old run (ignored).
ALTER TABLE tasks ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;

CREATE TABLE IF NOT EXISTS task_attempts (
    task_id      TEXT NOT NULL REFERENCES tasks (task_id),
    attempt      INTEGER NOT NULL,
    run_id       TEXT,
    status       TEXT NOT NULL,
    message      TEXT NOT NULL,
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER,
    PRIMARY KEY (task_id, attempt)
);

-- Tasks stored before attempts existed had exactly one.
INSERT INTO task_attempts (task_id, attempt, run_id, status, message, started_at, finished_at)
SELECT task_id, 1, NULL, status, message, created_at,
       CASE WHEN status IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN updated_at END
FROM tasks;
