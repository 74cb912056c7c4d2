-- API tokens: who may call the gateway, for which tenant, with which role. Only a hash of
-- each token is kept (SHA-256, hex); the token itself is shown once, when it is made.
-- Times are Unix milliseconds, as everywhere in this schema.
CREATE TABLE IF NOT EXISTS api_tokens (
    token_id      TEXT PRIMARY KEY,
    token_hash    TEXT NOT NULL UNIQUE,
    tenant        TEXT NOT NULL,
    role          TEXT NOT NULL,
    name          TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    revoked_at    INTEGER,
    last_used_at  INTEGER
);
