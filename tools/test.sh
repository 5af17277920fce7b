#!/usr/bin/env bash
# The whole test suite, as README.md names it: formatting, lints, unit, property,
# integration and doc tests (the README's gear project among them), loom models, the
# published crates (docs, `cargo package`, Rust of their rust-version), then the
# release `kythera` binary against independent
# clients (Python's `websockets`, and the Autobahn cases 1-13 run by `kosoku`), and the
# demo page in headless Chromium. Run from anywhere; it works on a fresh machine with the
# Rust toolchain through rustup (cargo, rustfmt, clippy; rustup fetches the Rust of
# rust-version), Python 3.11 with venv and Node.js with npm, and
# fetches crates from crates.io, the pinned Python packages of
# tools/conformance/requirements.txt from PyPI into .venv, playwright-core from npm into
# tools/browser/node_modules, and Debian's chromium and redis-server packages (apt-get,
# as root) if /usr/bin/chromium or redis-server is missing. The cluster tests start their
# own redis-server processes on ports they pick and stop them.
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs Debian packages that are missing (as root, or through sudo).
apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq "$@" >/dev/null \
        || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@" >/dev/null; }
}

# The workspace's rust-version (Cargo.toml), the oldest Rust the published crates build with.
msrv() {
    sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml
}

echo "== redis-server (Debian's package) for the cluster tests"
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server
fi
# The package's own service is not used (it would hold port 6379); tests start their own.
redis-server --version

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test (io_uring)"
# Unset KYTHERA_IO means auto, io_uring on this machine. The engine's suites start their
# servers with the driver KYTHERA_IO names, so the second run covers the epoll driver
# with the same tests (those that reach io_uring's own resources pin io_uring).
env -u KYTHERA_IO cargo test --workspace --locked
echo "== cargo test (epoll)"
KYTHERA_IO=epoll cargo test --workspace --locked

echo "== loom models of the registry's wake-up protocol"
# Built with --cfg loom in a target directory of their own, so that the normal build
# cache is not invalidated.
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p kythera-registry --release --locked --lib loom_tests

echo "== the published crates: docs with no warnings, cargo package, Rust $(msrv)"
# The crates users depend on, in publishing order; everything else has publish = false.
# `cargo package` packs each and builds it from its tarball against the others'
# (a local overlay of the crates packed before it), as crates.io would.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features --locked
# Cargo unpacks the overlay's tarballs under $CARGO_HOME/registry/src/-<hash of the
# overlay's path>/ and reuses a crate unpacked there before, of the same name and version,
# without comparing it; and a registry crate's build is fresh for as long as its version
# is. A checkout at a path packaged before would be verified against the old sources (CI
# failed this way once), so forget both the unpacked copies and our crates' builds.
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/kythera-* target/debug/.fingerprint/kythera-*
cargo package --locked --allow-dirty --workspace \
    --exclude tools --exclude benches --exclude kythera-tests --exclude shout
# rust-version is a promise: build the published crates with exactly that compiler
# (fetched by rustup on a fresh machine), in a target directory of its own.
msrv_toolchain="$(msrv)"
if ! rustup run "$msrv_toolchain" cargo --version >/dev/null 2>&1; then
    rustup toolchain install "$msrv_toolchain" --profile minimal
fi
CARGO_TARGET_DIR=target/msrv cargo "+$msrv_toolchain" check --locked --all-features \
    -p kythera-handler-api -p kythera-registry -p kythera-engine -p kythera-cluster \
    -p kythera-testkit -p kythera

echo "== cargo build --release kythera"
# Without -p, so that features unify over the whole workspace exactly as for the
# README's `cargo run --release`: either command then reuses the other's build.
cargo build --release --locked --bin kythera
# ... and check it: the README's first command must find nothing to compile.
rebuilt=$(cargo run --release --locked -- --version 2>&1 | grep -c '^ *Compiling' || true)
if [ "$rebuilt" != 0 ]; then
    echo "cargo run --release recompiled $rebuilt crates after the test build" >&2
    exit 1
fi

echo "== fuzz targets: build on stable, replay fuzz/seeds through each"
# A target that stops compiling, or a known input that now fails its expectations,
# fails here. Fuzzing itself (nightly, cargo-fuzz) is in fuzz/README.md; on stable the
# targets link libFuzzer without coverage instrumentation, which is all a replay needs.
(cd fuzz && cargo build --release --locked --bins)
for target in handshake frame_decoder fragments deflate; do
    timeout 300 "fuzz/target/release/$target" fuzz/seeds/"$target"/* 2>&1 | tail -n 2
done

echo "== python venv .venv (tools/conformance/requirements.txt)"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Install only when the pinned list changed since the last install.
if ! cmp -s tools/conformance/requirements.txt .venv/kythera-requirements.txt; then
    .venv/bin/pip install -q --disable-pip-version-check -r tools/conformance/requirements.txt
    cp tools/conformance/requirements.txt .venv/kythera-requirements.txt
fi

echo "== kythera where io_uring is refused (seccomp: EPERM, ENOSYS): epoll, or exit with --io uring"
env -u KYTHERA_IO .venv/bin/python tools/conformance/no_io_uring.py

# Runs a conformance command against both drivers at once (separate servers on ports
# they pick; OUTDIR in the arguments becomes target/epoll/... for the epoll run) and
# fails if either fails; the epoll run's output is printed after the io_uring run's.
both_drivers() {
    local log rc=0 pid
    log=$(mktemp)
    mkdir -p target/epoll
    local epoll_args=()
    for a in "$@"; do epoll_args+=("${a//target\//target/epoll/}"); done
    KYTHERA_IO=epoll "${epoll_args[@]}" >"$log" 2>&1 &
    pid=$!
    KYTHERA_IO=uring "$@" || rc=$?
    wait "$pid" || rc=$?
    sed 's/^/[epoll] /' "$log"
    rm -f "$log"
    return "$rc"
}

echo "== python websockets client against kythera, io_uring and epoll (no compression; permessage-deflate)"
both_drivers .venv/bin/python tools/conformance/python_client.py
both_drivers .venv/bin/python tools/conformance/python_client.py --compression deflate
# Context takeover both ways, a 12-bit client window, and messages under 100 bytes sent
# uncompressed on the compressed connection.
both_drivers .venv/bin/python tools/conformance/python_client.py --compression deflate \
    --server-arg=--deflate-server-no-context-takeover=false \
    --server-arg=--deflate-client-no-context-takeover=false \
    --server-arg=--deflate-client-max-window-bits=12 --server-arg=--deflate-min-bytes=100

echo "== python websockets client over wss:// (a TLS listener, a test CA from trustme), io_uring and epoll"
both_drivers .venv/bin/python tools/conformance/python_client.py --tls
both_drivers .venv/bin/python tools/conformance/python_client.py --tls --compression deflate

echo "== live handover to a new process (tools/conformance/handover.py): io_uring, epoll, and each to the other"
# 1,000 echo clients and chat rooms through two handovers, a new process killed
# midway, a gear that does not opt in, permessage-deflate, a half-received frame.
.venv/bin/python tools/conformance/handover.py --old-io uring --new-io uring
.venv/bin/python tools/conformance/handover.py --old-io epoll --new-io uring --clients 300
.venv/bin/python tools/conformance/handover.py --old-io uring --new-io epoll --clients 300

echo "== autobahn cases 1-13 (kosoku) against kythera, io_uring and epoll"
# Cases 9.1.5-9.2.6 echo 8 and 16 MiB messages; the default limit (5,000,000 bytes,
# antikythera's) would close them with 1009, which Autobahn counts as a failure. The
# conformance run raises the limit; the limit itself is tested in tests/lifecycle.rs.
both_drivers .venv/bin/python tools/conformance/autobahn.py --outdir target/autobahn \
    --server-arg=--max-message-bytes=20000000
echo "== autobahn cases 13.* with context takeover configured on the server, io_uring and epoll"
# kythera's defaults agree to no context takeover either way; this run makes the server
# keep a compressor per connection (kosoku always offers client_no_context_takeover).
both_drivers .venv/bin/python tools/conformance/autobahn.py --cases '13.*' --outdir target/autobahn-takeover \
    --server-arg=--deflate-server-no-context-takeover=false \
    --server-arg=--deflate-client-no-context-takeover=false

echo "== autobahn cases 1-10 over wss:// (kosoku through a TLS relay: tools/conformance/tls_relay.py), io_uring and epoll"
both_drivers .venv/bin/python tools/conformance/autobahn.py --tls --outdir target/autobahn-tls \
    --server-arg=--max-message-bytes=20000000 \
    --cases '1.*' --cases '2.*' --cases '3.*' --cases '4.*' --cases '5.*' --cases '6.*' \
    --cases '7.*' --cases '9.*' --cases '10.*'

echo "== container files: hadolint, shellcheck, docker-compose config (tools/check-container.sh)"
./tools/check-container.sh

echo "== demo page in headless Chromium (tools/browser: playwright-core, Debian's chromium)"
# Debian's chromium: the page is driven by playwright-core with executablePath, since
# Playwright's own browser download cannot run here.
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
    apt_install chromium
fi
# Install only when the lock file changed since the last install.
if ! cmp -s tools/browser/package-lock.json tools/browser/node_modules/.kythera-lock.json; then
    (cd tools/browser && npm ci --no-audit --no-fund --loglevel=error)
    cp tools/browser/package-lock.json tools/browser/node_modules/.kythera-lock.json
fi
node tools/browser/demo.test.mjs
echo "== the demo page over https:// and wss:// in headless Chromium (a self-signed certificate it is told to trust)"
command -v openssl >/dev/null || apt_install openssl
node tools/browser/demo.test.mjs --tls
echo "== demo page on two cluster nodes in headless Chromium (Redis, two kythera nodes)"
node tools/browser/cluster.test.mjs
