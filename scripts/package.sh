#!/usr/bin/env bash
# Builds tokenwarden's Debian package and prints its path: the release binary, then its manual
# pages and bash/zsh/fish completions generated from the CLI definition into target/assets/
# (`tokenwarden generate-assets`, hidden), then `cargo deb --no-build` with the assets listed in
# Cargo.toml's [package.metadata.deb].
# Usage: bash scripts/package.sh   (from anywhere; needs Rust, installs cargo-deb if missing)
# Then:  sudo apt install ./target/debian/tokenwarden_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
cargo_deb_version=3.8.0

if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb $cargo_deb_version" >&2
  cargo install cargo-deb --locked --version "$cargo_deb_version"
fi

cargo build --release --locked
# Relative to the crate, not $CARGO_TARGET_DIR: that is where Cargo.toml's assets point.
rm -rf target/assets
cargo run --release --locked --quiet -- generate-assets target/assets >/dev/null
# cargo-deb prints the path of the package it wrote on stdout.
deb=$(cargo deb --no-build --locked)
echo "$deb"
