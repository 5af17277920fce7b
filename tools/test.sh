#!/usr/bin/env bash
# The whole test suite, as README.md names it: formatting, lints, unit, property,
# integration and doc tests. Run from anywhere; it works on a fresh machine with the
# Rust toolchain (cargo, rustfmt, clippy) and fetches crates from crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked
