-- Saved environments (per tenant, by name) and the cache of prepared states made from
-- them. `definition` is the SetupSpec as JSON; `secrets` is a JSON object of secret name
-- to sealed value (never plain text). Times are Unix milliseconds, as everywhere in this
-- schema.
CREATE TABLE IF NOT EXISTS environments (
    tenant            TEXT NOT NULL,
    name              TEXT NOT NULL,
    repo              TEXT,
    definition        TEXT NOT NULL,
    secrets           TEXT NOT NULL,
    secrets_version   INTEGER NOT NULL,
    cache_generation  INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    PRIMARY KEY (tenant, name)
);

-- One prepared state (`envcache/<tenant>/<cache_key>.tar.zst` in the object store);
-- `environment` names the saved environment it was made from, if any.
CREATE TABLE IF NOT EXISTS env_cache (
    tenant        TEXT NOT NULL,
    cache_key     TEXT NOT NULL,
    environment   TEXT,
    bytes         INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, cache_key)
);

CREATE INDEX IF NOT EXISTS env_cache_lru ON env_cache (tenant, last_used_at);
CREATE INDEX IF NOT EXISTS env_cache_environment ON env_cache (tenant, environment);
