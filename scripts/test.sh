#!/usr/bin/env bash
# Runs every test of tokenwarden: the Rust unit and integration tests, including the Python
# grpcio client test (tests/python/), whose packages go into a venv at .venv (made or reused).
# Usage: bash scripts/test.sh   (from anywhere; works on a fresh machine with Rust and python3;
# on Debian, python3's venv module is the python3-venv package, which .ci/run installs)
set -euo pipefail
cd "$(dirname "$0")/.."

venv_fail() {
  echo "scripts/test.sh: $1" >&2
  echo "  The Python client test needs python3 with its venv module and PyPI access" >&2
  echo "  (Debian/Ubuntu: apt-get install python3 python3-venv)." >&2
  exit 1
}

command -v python3 >/dev/null || venv_fail "python3 not found"
# Reuse .venv when its python and pip work; otherwise (absent, half made, or its python gone)
# make it anew.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  python3 -c 'import ensurepip, venv' 2>/dev/null \
    || venv_fail "python3 has no venv/ensurepip module"
  rm -rf .venv
  python3 -m venv .venv || { rm -rf .venv; venv_fail "python3 -m venv .venv failed"; }
fi
# Install only when the requirements changed since the last install.
if ! cmp -s tests/python/requirements.txt .venv/.tokenwarden-requirements.txt; then
  .venv/bin/python -m pip install -q --disable-pip-version-check \
    -r tests/python/requirements.txt \
    || venv_fail "pip install -r tests/python/requirements.txt failed"
  cp tests/python/requirements.txt .venv/.tokenwarden-requirements.txt
fi
export TOKENWARDEN_PYTHON="$PWD/.venv/bin/python"

cargo test --locked --all-targets

# No unwrap()/expect()/panic! in shipped code (tests may): the library denies them outside
# tests (src/lib.rs), which only clippy checks. Skipped with a note where clippy is missing
# (`rustup component add clippy`; .ci/run adds it).
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --locked --lib --bins -- -D clippy::unwrap_used -D clippy::expect_used -D clippy::panic
else
  echo "scripts/test.sh: cargo clippy not found: the no-unwrap check of shipped code was skipped" >&2
fi
