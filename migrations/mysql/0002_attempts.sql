-- Attempts: each run of a task's workflow (the first, a retry, a reset done in Temporal),
-- numbered from 1 and kept with its outcome; the same schema as migrations/sqlite.
ALTER TABLE tasks ADD COLUMN attempt BIGINT NOT NULL DEFAULT 1;

CREATE TABLE IF NOT EXISTS task_attempts (
    task_id      VARCHAR(128) NOT NULL,
    attempt      BIGINT NOT NULL,
    run_id       VARCHAR(128) NULL,
    status       VARCHAR(32) NOT NULL,
    message      LONGTEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT NULL,
    PRIMARY KEY (task_id, attempt),
    CONSTRAINT task_attempts_task_fk FOREIGN KEY (task_id) REFERENCES tasks (task_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- Tasks stored before attempts existed had exactly one.
INSERT IGNORE INTO task_attempts (task_id, attempt, run_id, status, message, started_at, finished_at)
SELECT task_id, 1, NULL, status, message, created_at,
       CASE WHEN status IN ('COMPLETED', 'FAILED', 'CANCELLED') THEN updated_at END
FROM tasks;
