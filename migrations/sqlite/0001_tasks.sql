-- Tasks and their history. Times are Unix milliseconds (UTC) so every database kind
-- stores and compares them the same way.
CREATE TABLE IF NOT EXISTS tasks (
    task_id          TEXT PRIMARY KEY NOT NULL,
    tenant           TEXT NOT NULL,
    idempotency_key  TEXT,
    batch_id         TEXT,
    status           TEXT NOT NULL,
    message          TEXT NOT NULL DEFAULT '',
    spec             TEXT NOT NULL,
    summary          TEXT,
    pr_url           TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (tenant, idempotency_key);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks (created_at DESC, task_id DESC);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, created_at DESC);
CREATE INDEX IF NOT EXISTS tasks_batch ON tasks (batch_id);

CREATE TABLE IF NOT EXISTS task_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id  TEXT NOT NULL REFERENCES tasks (task_id),
    kind     TEXT NOT NULL,
    status   TEXT,
    message  TEXT NOT NULL,
    at       INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS task_events_task ON task_events (task_id, seq);
