#!/usr/bin/env bash
# Runs every test of tokenwarden: the Rust unit and integration tests.
# Usage: bash scripts/test.sh   (from anywhere; works on a fresh machine with Rust installed)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked --all-targets
