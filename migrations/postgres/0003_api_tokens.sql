-- API tokens: who may call the gateway, for which tenant, with which role. Only a hash of
-- each token is kept (SHA-256, hex); the same schema as migrations/sqlite.
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id      TEXT COLLATE "C" PRIMARY KEY,
    token_hash    TEXT COLLATE "C" NOT NULL UNIQUE,
    tenant        TEXT NOT NULL,
    role          TEXT NOT NULL,
    name          TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT,
    revoked_at    BIGINT,
    last_used_at  BIGINT
);
