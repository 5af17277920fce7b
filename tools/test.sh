#!/usr/bin/env bash
# The whole test suite, as README.md names it: formatting, lints, unit, property,
# integration and doc tests, loom models, then the release `kythera` binary against independent
# clients (Python's `websockets`, and the Autobahn cases 1-10 run by `kosoku`). Run from
# anywhere; it works on a fresh machine with the Rust toolchain (cargo, rustfmt, clippy)
# and Python 3.11 with venv, and fetches crates from crates.io and the pinned Python
# packages of tools/conformance/requirements.txt from PyPI into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked

echo "== loom models of the registry's wake-up protocol"
# Built with --cfg loom in a target directory of their own, so that the normal build
# cache is not invalidated.
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p registry --release --locked --lib loom_tests

echo "== cargo build --release kythera"
cargo build --release -p tools --bin kythera --locked

echo "== python venv .venv (tools/conformance/requirements.txt)"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Install only when the pinned list changed since the last install.
if ! cmp -s tools/conformance/requirements.txt .venv/kythera-requirements.txt; then
    .venv/bin/pip install -q --disable-pip-version-check -r tools/conformance/requirements.txt
    cp tools/conformance/requirements.txt .venv/kythera-requirements.txt
fi

echo "== kythera where io_uring is refused (seccomp: EPERM, ENOSYS)"
.venv/bin/python tools/conformance/no_io_uring.py

echo "== python websockets client against kythera"
.venv/bin/python tools/conformance/python_client.py

echo "== autobahn cases 1-10 (kosoku) against kythera"
# Cases 9.1.5-9.2.6 echo 8 and 16 MiB messages; the default limit (5,000,000 bytes,
# antikythera's) would close them with 1009, which Autobahn counts as a failure. The
# conformance run raises the limit; the limit itself is tested in tests/lifecycle.rs.
.venv/bin/python tools/conformance/autobahn.py --server-arg=--max-message-bytes=20000000
