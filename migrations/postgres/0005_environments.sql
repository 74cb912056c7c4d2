-- Saved environments and the cache of prepared states made from them: the same schema as
-- migrations/sqlite. Names and keys are collated "C" (byte order) so listings order them
-- exactly as SQLite does, whatever the database's default locale is.
CREATE TABLE IF NOT EXISTS environments (
    tenant            TEXT COLLATE "C" NOT NULL,
    name              TEXT COLLATE "C" NOT NULL,
    repo              TEXT,
    definition        TEXT NOT NULL,
    secrets           TEXT NOT NULL,
    secrets_version   BIGINT NOT NULL,
    cache_generation  BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
);

CREATE TABLE IF NOT EXISTS env_cache (
    tenant        TEXT COLLATE "C" NOT NULL,
    cache_key     TEXT COLLATE "C" NOT NULL,
    environment   TEXT COLLATE "C",
    bytes         BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, cache_key)
);

CREATE INDEX IF NOT EXISTS env_cache_lru ON env_cache (tenant, last_used_at);
CREATE INDEX IF NOT EXISTS env_cache_environment ON env_cache (tenant, environment);
