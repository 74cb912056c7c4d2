-- Attempts: each run of a task's workflow (the first, a retry, a reset done in Temporal),
-- numbered from 1 and kept with its outcome; the same schema as migrations/sqlite.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS attempt BIGINT NOT NULL DEFAULT 1;

CREATE TABLE IF NOT EXISTS task_attempts (
    task_id      TEXT COLLATE "C" NOT NULL REFERENCES tasks (task_id),
    attempt      BIGINT NOT NULL,
    run_id       TEXT,
    status       TEXT NOT NULL,
    message      TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    PRIMARY KEY (task_id, attempt)
);

-- Tasks stored before attempts existed had exactly one.
INSERT INTO task_attempts (task_id, attempt, run_id, status, message, started_at, finished_at)
SELECT task_id, 1, NULL, status, message, created_at,
       CASE WHEN status IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN updated_at END
FROM tasks
ON CONFLICT DO NOTHING;
