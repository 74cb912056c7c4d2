-- Tasks and their history on MySQL and MariaDB: the same schema as migrations/sqlite. Times
-- are Unix milliseconds (UTC) so every database kind stores and compares them the same way;
-- spec, summary and messages are JSON or free text kept as LONGTEXT, as TEXT is on SQLite.
--
-- Indexed text columns need a length here. The limits hold what patchflow-core accepts
-- (task ids up to 128 characters, tenants 64, idempotency keys 256); batch ids are not
-- validated there, and one longer than 128 is refused here (the store runs in strict mode).
-- utf8mb4_bin compares bytes, as SQLite does: ids and keys are case-sensitive and the
-- listing orders ties the same way. (It pads: trailing spaces are ignored in comparisons.)
-- Indexes live inside CREATE TABLE because MySQL has no CREATE INDEX IF NOT EXISTS.
CREATE TABLE IF NOT EXISTS tasks (
    task_id          VARCHAR(128) NOT NULL,
    tenant           VARCHAR(64) NOT NULL,
    idempotency_key  VARCHAR(256) NULL,
    batch_id         VARCHAR(128) NULL,
    status           VARCHAR(32) NOT NULL,
    message          LONGTEXT NOT NULL DEFAULT (''),
    spec             LONGTEXT NOT NULL,
    summary          LONGTEXT NULL,
    pr_url           TEXT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    PRIMARY KEY (task_id),
    UNIQUE KEY tasks_idempotency (tenant, idempotency_key),
    KEY tasks_created (created_at DESC, task_id DESC),
    KEY tasks_status (status, created_at DESC),
    KEY tasks_batch (batch_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS task_events (
    seq      BIGINT NOT NULL AUTO_INCREMENT,
    task_id  VARCHAR(128) NOT NULL,
    kind     VARCHAR(16) NOT NULL,
    status   VARCHAR(32) NULL,
    message  LONGTEXT NOT NULL,
    at       BIGINT NOT NULL,
    PRIMARY KEY (seq),
    KEY task_events_task (task_id, seq),
    CONSTRAINT task_events_task_fk FOREIGN KEY (task_id) REFERENCES tasks (task_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
