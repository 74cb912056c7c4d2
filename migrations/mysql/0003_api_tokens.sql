-- API tokens: who may call the gateway, for which tenant, with which role. Only a hash of
-- each token is kept (SHA-256, hex); the same schema as migrations/sqlite.
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id      VARCHAR(64) NOT NULL,
    token_hash    CHAR(64) NOT NULL,
    tenant        VARCHAR(255) NOT NULL,
    role          VARCHAR(16) NOT NULL,
    name          VARCHAR(255) NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NULL,
    revoked_at    BIGINT NULL,
    last_used_at  BIGINT NULL,
    PRIMARY KEY (token_id),
    UNIQUE KEY api_tokens_hash (token_hash)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
