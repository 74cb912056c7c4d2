-- Saved environments and the cache of prepared states made from them: the same schema as
-- migrations/sqlite. Tenants are at most 128 characters (patchflow-core's tenant names),
-- environment names 64, cache keys 255; definitions and sealed secrets are JSON kept as
-- LONGTEXT. utf8mb4_bin compares bytes, as SQLite does.
CREATE TABLE IF NOT EXISTS environments (
    tenant            VARCHAR(128) NOT NULL,
    name              VARCHAR(64) NOT NULL,
    repo              TEXT NULL,
    definition        LONGTEXT NOT NULL,
    secrets           LONGTEXT NOT NULL,
    secrets_version   BIGINT NOT NULL,
    cache_generation  BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    PRIMARY KEY (tenant, name)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS env_cache (
    tenant        VARCHAR(128) NOT NULL,
    cache_key     VARCHAR(255) NOT NULL,
    environment   VARCHAR(64) NULL,
    bytes         BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT NOT NULL,
    PRIMARY KEY (tenant, cache_key),
    KEY env_cache_lru (tenant, last_used_at),
    KEY env_cache_environment (tenant, environment)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
