#!/usr/bin/env bash
# tools/bench.sh: the end-to-end benchmark matrix (issue 5): kythera (1 shard) against
# fastwebsockets 0.10 and tokio-tungstenite 0.30 (tokio current-thread), with
# kythera-load as the client; echo throughput and server CPU per message, memory per
# idle connection, handshake rate; a markdown table, a results.json and PNG charts.
#
#   tools/bench.sh                          # the full matrix (about 30 minutes, see below)
#   QUICK=1 tools/bench.sh                  # a smoke run: 1 cell, 1 s windows, 1 repeat
#   SERVERS="kythera fastwebsockets" CONNECTIONS=1000 SIZES="20 512" tools/bench.sh
#   MEMORY=0 HANDSHAKES=0 REPEATS=5 tools/bench.sh
#
# What it does:
#   1. Builds the release binaries: kythera and kythera-load (tools), fastwebsockets-
#      echo, tungstenite-echo and bench-chart (benches).
#   2. Echo matrix: for every cell (CONNECTIONS x SIZES x INFLIGHT), every repeat and
#      every server in turn (interleaved: r1 A B C, r2 A B C, ...) it starts the server
#      alone on a free loopback port pinned to SERVER_CPU (`taskset -c 0`; kythera with
#      `--shards 1`), waits for its ready line, runs `kythera-load echo` pinned to
#      CLIENT_CPU (`taskset -c 1`) against ws://127.0.0.1:PORT/echo, then stops the
#      server (SIGTERM, SIGKILL after 10 s).
#   3. Memory (MEMORY=1): for every server and every N in MEMORY_CONNECTIONS, a fresh
#      server (pinned as above) gets `kythera-load connect -c N --hold HOLD`; the
#      connections finish their handshake and stay open and idle. Then kythera with
#      `--shards 2` (not pinned; its shards pin themselves) gets SHARDS2_TARGET
#      connections from several kythera-load processes at once (at most PER_CLIENT
#      each, each from its own source address 127.0.0.K, so neither the client's
#      open-file limit nor its ephemeral ports run out), to see how many it reaches.
#   4. Handshakes (HANDSHAKES=1): for every repeat and server in turn, a fresh server
#      gets `kythera-load connect -c HANDSHAKE_CONNECTIONS` (no hold).
#   5. Cluster (CLUSTER=1): tools/bench-cluster.sh OUT/cluster: one Redis and three
#      kythera nodes; cross-node send_message rate and latency, publish to a group
#      spread over the nodes against the same on one node, Redis commands and bytes
#      per message (see that script). Its table is appended to OUT/table.md.
#   6. Writes OUT/results.json (medians), OUT/table.md (also printed) and, with
#      bench-chart, OUT/echo-msgs.png, OUT/echo-cpu.png, OUT/echo-floors.png (with a
#      floor in the run), OUT/memory.png and
#      OUT/handshakes.png. Every run's own JSON (kythera-load --json) is in OUT/raw/ and
#      indexed, one line per run, in OUT/runs.jsonl.
#
# What the numbers mean:
#   msgs/s          echoes completed by the client in the DURATION window after WARMUP
#                   seconds of traffic (median over the repeats).
#   CPU µs/msg      the server's CPU time (utime + stime of /proc/PID/stat, all its
#                   threads) in that window divided by the echoes in it; kythera-load
#                   reads /proc/PID/stat itself at the instants its window opens and
#                   closes (`--server-pid`), so both cover the same window. A client
#                   that saturates its core caps msgs/s for every server alike; CPU per
#                   message still tells the servers apart. On loopback it includes the
#                   kernel's work of delivering the server's sends into the client's
#                   socket (a few µs per echo for every server). /proc/PID/stat counts
#                   in clock ticks (10 ms): over a 5 s window that is 0.2% of a busy
#                   core, over a 1 s QUICK window 1%.
#   ratios          kythera / other in the same cell, medians over medians: msgs/s above
#                   1 means kythera is faster, CPU/msg below 1 means it is cheaper.
#   server busy,    the share of one core each side used in the window; a side near
#   client busy     100% is the limit. "other load" is the machine's busy CPU time
#                   (/proc/stat) that neither of them was charged with, in cores: near 0
#                   on a quiet machine; above MAX_OTHER_LOAD the script warns.
#   B/idle conn     (server VmRSS with N idle connections open - VmRSS before the first
#                   connect) / N. Kernel socket memory is not in the server's RSS and
#                   not counted.
#   handshakes/s    established connections / (last 101 - first connect), with up to 256
#                   connects and handshakes in flight; "server µs/handshake" is the
#                   server's CPU time over the connect phase per connection (in 10 ms
#                   ticks: coarse below ~10,000 connections).
#
# Environment (defaults in brackets; QUICK=1 changes the ones marked *):
#   SERVERS       servers, in run order ["kythera fastwebsockets tungstenite"]; also
#                 "kythera-epoll" (the epoll driver, `--io epoll`), "epoll-floor"
#                 (benches/src/bin/epoll-floor.rs: the least an echo on epoll does,
#                 no validation, no gear: the floor of the epoll cells), "uring-floor"
#                 (benches/src/bin/uring-floor.rs: the same on io_uring, with
#                 kythera's ring set-up); with a floor in the run a second table gives
#                 kythera / uring-floor, kythera-epoll / epoll-floor (as ratios of
#                 medians and, paired, as medians of the ratios of the runs in one
#                 repeat) and kythera / the better floor per cell,
#                 "kythera-plain" (plain fds instead of direct descriptors),
#                 "kythera-zc" (zero-copy sends from 16 KiB), "kythera-4k" (1024
#                 receive buffers of 4 KiB, each receive taking a whole one: the
#                 default before incremental buffers), "kythera-deflate" (the client offers
#                 permessage-deflate; kythera's defaults: no context takeover, one
#                 compressor per shard) and "kythera-deflate-ctx" (context takeover both
#                 ways: a compressor and a decompressor per connection). Compare them
#                 with kythera in one run: SERVERS="kythera kythera-deflate
#                 kythera-deflate-ctx"; the echo runs' "server_rss_per_connection" (RSS
#                 at the end of the window) gives memory per connection after traffic.
#                 "kythera-tls" and "fastwebsockets-tls": the same over wss:// (kythera's
#                 --tls-listen; fastwebsockets-echo behind tokio-rustls), with a
#                 self-signed certificate made by openssl that the client trusts (--ca);
#                 compare them with REFERENCE=kythera-tls.
#   REFERENCE     the server the ratios are of [kythera]
#   CONNECTIONS * connection counts ["100 1000 10000"; quick: 100]
#   SIZES       * payload sizes in bytes ["20 512 16384"; quick: 20]
#   INFLIGHT    * messages in flight per connection ["1 16"; quick: 1]
#   KIND          text or binary [text]
#   REPEATS     * repeats per server and cell [3; quick: 1]
#   WARMUP      * seconds of warm-up before the window [2; quick: 0.5]
#   DURATION    * seconds measured [5; quick: 1]
#   ECHO=0        skip the echo matrix
#   MEMORY=0      skip the memory runs
#   MEMORY_CONNECTIONS * idle connection counts ["10000 18000"; quick: 1000]
#   HOLD        * seconds the idle connections are held [5; quick: 1]
#   SHARDS2_TARGET * connections for kythera --shards 2, 0 to skip [38000; quick: 2000]
#   PER_CLIENT    connections per kythera-load process there [19000]
#   SHARDS2_HOLD * seconds each of those holds its connections: long enough for the
#                 others to connect and the RSS to be read (about 5 s after) [10; quick: 6]
#   HANDSHAKES=0  skip the handshake runs
#   CLUSTER=0     skip the cluster scenario (its settings: CLUSTER_* in tools/bench-cluster.sh;
#                 quick: 1 repeat, 2 s windows, 3,000 members)
#   HANDSHAKE_CONNECTIONS * connections per handshake run [10000; quick: 1000]
#   HANDSHAKE_CPU_QUOTA  percent of one core each server may use in the handshake runs
#                 (a cgroup CPU quota, v1 or v2), so that the server and not the
#                 one-core client is the limit and handshakes/s compares the servers
#                 (TLS: the client's handshake costs as much as the server's) [0: none]
#   SERVER_CPU    core for the server [0]; CLIENT_CPU core for the client [1]
#   FWS_HANDSHAKE hyper (as fastwebsockets documents) or raw (no hyper) [hyper]
#   MAX_OTHER_LOAD  cores of other load in a window above which it warns [0.15]
#   OUT           the results folder [target/bench/YYYYmmdd-HHMMSS]
#   SKIP_BUILD=1  use the binaries already in target/release
#   CHARTS=0      no PNG charts
#
# A run that fails (a failed handshake, a wrong echo, a server that dies) is reported
# on stderr, kept in OUT/raw and OUT/runs.jsonl with its exit status, left out of the
# medians, and makes the script exit with status 1 at the end; the rest goes on.
#
# Duration of the full matrix: 18 cells x 3 servers x 3 repeats = 162 echo runs of
# about 9-10 s (start, connect, 2 s warm-up, 5 s window, close, stop), ~26 min; memory
# ~2 min; handshakes ~1 min: about 30 minutes on a quiet 2-core machine.
#
# The machine: 2+ cores, an open-file hard limit of at least 20,000 (the script raises
# its soft limit to the hard one, for itself, the servers and the clients), taskset
# (util-linux), ss (iproute2) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    q() { printf '%s' "$1"; }
else
    q() { printf '%s' "$2"; }
fi
SERVERS=${SERVERS:-"kythera fastwebsockets tungstenite"}
REFERENCE=${REFERENCE:-kythera}
CONNECTIONS=${CONNECTIONS:-$(q "100" "100 1000 10000")}
SIZES=${SIZES:-$(q "20" "20 512 16384")}
INFLIGHT=${INFLIGHT:-$(q "1" "1 16")}
KIND=${KIND:-text}
REPEATS=${REPEATS:-$(q 1 3)}
WARMUP=${WARMUP:-$(q 0.5 2)}
DURATION=${DURATION:-$(q 1 5)}
ECHO=${ECHO:-1}
# SUMMARY_ONLY=1: no runs; rebuild table.md, results.json and the charts from the runs
# already in OUT (after adding the runs of another invocation to OUT/runs.jsonl).
SUMMARY_ONLY=${SUMMARY_ONLY:-0}
MEMORY=${MEMORY:-1}
MEMORY_CONNECTIONS=${MEMORY_CONNECTIONS:-$(q "1000" "10000 18000")}
HOLD=${HOLD:-$(q 1 5)}
SHARDS2_TARGET=${SHARDS2_TARGET:-$(q 2000 38000)}
PER_CLIENT=${PER_CLIENT:-19000}
SHARDS2_HOLD=${SHARDS2_HOLD:-$(q 6 10)}
HANDSHAKES=${HANDSHAKES:-1}
CLUSTER=${CLUSTER:-1}
HANDSHAKE_CONNECTIONS=${HANDSHAKE_CONNECTIONS:-$(q 1000 10000)}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
FWS_HANDSHAKE=${FWS_HANDSHAKE:-hyper}
MAX_OTHER_LOAD=${MAX_OTHER_LOAD:-0.15}
CHARTS=${CHARTS:-1}
OUT=${OUT:-target/bench/$(date +%Y%m%d-%H%M%S)}
BIN="$ROOT/target/release"
LOAD="$BIN/kythera-load"

die() {
    echo "bench: $*" >&2
    exit 2
}
warn() { echo "bench: warning: $*" >&2; }
posint() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '$2'"; }
number() { [[ $2 =~ ^[0-9]*\.?[0-9]+$ ]] || die "$1 must be a number, not '$2'"; }

for s in $SERVERS; do
    case $s in
    kythera | kythera-epoll | kythera-plain | kythera-zc | kythera-4k | kythera-deflate | kythera-deflate-ctx | kythera-tls | fastwebsockets | fastwebsockets-tls | tungstenite | epoll-floor | uring-floor) ;;
    *) die "unknown server '$s' in SERVERS (kythera, kythera-epoll, kythera-plain, kythera-zc, kythera-4k, kythera-deflate, kythera-deflate-ctx, kythera-tls, fastwebsockets, fastwebsockets-tls, tungstenite, epoll-floor, uring-floor)" ;;
    esac
done
case $KIND in text | binary) ;; *) die "KIND is text or binary, not '$KIND'" ;; esac
case $FWS_HANDSHAKE in hyper | raw) ;; *) die "FWS_HANDSHAKE is hyper or raw" ;; esac
for n in $CONNECTIONS $SIZES $INFLIGHT $MEMORY_CONNECTIONS; do posint "CONNECTIONS, SIZES, INFLIGHT and MEMORY_CONNECTIONS" "$n"; done
posint REPEATS "$REPEATS"
posint PER_CLIENT "$PER_CLIENT"
posint HANDSHAKE_CONNECTIONS "$HANDSHAKE_CONNECTIONS"
HANDSHAKE_CPU_QUOTA=${HANDSHAKE_CPU_QUOTA:-0}
[[ $HANDSHAKE_CPU_QUOTA == 0 ]] || posint HANDSHAKE_CPU_QUOTA "$HANDSHAKE_CPU_QUOTA"
[[ $SHARDS2_TARGET =~ ^[0-9]+$ ]] || die "SHARDS2_TARGET must be a number of connections"
number WARMUP "$WARMUP"
number DURATION "$DURATION"
number HOLD "$HOLD"
number SHARDS2_HOLD "$SHARDS2_HOLD"
number MAX_OTHER_LOAD "$MAX_OTHER_LOAD"
for t in taskset ss python3; do command -v $t >/dev/null || die "$t not found"; done
ncpu=$(nproc --all)
((SERVER_CPU < ncpu && CLIENT_CPU < ncpu)) ||
    die "SERVER_CPU=$SERVER_CPU / CLIENT_CPU=$CLIENT_CPU: this machine has $ncpu CPUs"
[[ $SERVER_CPU != "$CLIENT_CPU" ]] || warn "server and client share CPU $SERVER_CPU"

# Open files: the servers hold a descriptor per connection (kythera's are direct
# descriptors, one table per shard of about this limit), the clients one per socket.
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -Sn)
need=0
for n in $CONNECTIONS $MEMORY_CONNECTIONS $HANDSHAKE_CONNECTIONS; do ((n > need)) && need=$n; done
((NOFILE >= need + 64)) || warn "the open-file limit is $NOFILE; $need connections need about $((need + 64))"

mkdir -p "$OUT/raw"
OUT=$(cd "$OUT" && pwd)
LOGDIR="$OUT/logs"
mkdir -p "$LOGDIR"
RUNS="$OUT/runs.jsonl"
if [[ $SUMMARY_ONLY == 1 ]]; then
    ECHO=0 MEMORY=0 HANDSHAKES=0 CLUSTER=0
else
    : >"$RUNS"
fi
FAILED=0

# --- cleanup: whatever is running when the script ends, for any reason -------------
SERVER_PID=""
CLIENT_PIDS=()
stop_pid() { # pid, seconds to wait after SIGTERM
    local pid=$1 wait_s=${2:-10} i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || {
        wait "$pid" 2>/dev/null || true
        return 0
    }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "pid $pid did not exit ${wait_s}s after SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${CLIENT_PIDS[@]}"; do stop_pid "$p" 2; done
    stop_pid "$SERVER_PID" 5
    [[ -n $CGROUP ]] && rmdir "$CGROUP" 2>/dev/null
    exit "$rc"
}
CGROUP=""
# Servers started while QUOTA_SERVERS=1 run in CGROUP, held to HANDSHAKE_CPU_QUOTA% of
# a core.
QUOTA_SERVERS=0
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build -------------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    echo "== cargo build --release --bins (the whole workspace's, as cargo run --release builds)" >&2
    cargo build --release --bins || die "build failed"
fi
for b in kythera kythera-load fastwebsockets-echo tungstenite-echo epoll-floor uring-floor; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing (build it, or unset SKIP_BUILD)"
done

# The TLS servers' certificate (a self-signed one for localhost, made here with
# openssl; the client trusts exactly it with --ca).
TLS_DIR="$OUT/tls"
if [[ " $SERVERS " == *-tls* ]]; then
    command -v openssl >/dev/null || die "the -tls servers need openssl to make a test certificate"
    mkdir -p "$TLS_DIR"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -addext basicConstraints=critical,CA:FALSE \
        -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" 2>/dev/null \
        || die "openssl could not make the test certificate"
fi

# The URL of the server just started, and the client options its scheme needs.
server_url() { # server name; sets URL and URL_ARGS
    if [[ $1 == *-tls ]]; then
        URL="wss://localhost:$SERVER_PORT/echo"
        URL_ARGS=(--ca "$TLS_DIR/cert.pem")
    else
        URL="ws://127.0.0.1:$SERVER_PORT/echo"
        URL_ARGS=()
    fi
}

# A free loopback port: bound by the kernel's choice, then released for the server.
free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Starts server $1 (log $2; optional $3: "unpinned" for kythera-2shards); sets
# SERVER_PID and SERVER_PORT.
start_server() {
    local name=$1 log=$2 port cmd ready i pin
    port=$(free_port)
    pin=(taskset -c "$SERVER_CPU")
    ready="kythera listening on"
    case $name in
    kythera) cmd=("$BIN/kythera" --listen "127.0.0.1:$port" --shards 1) ;;
    kythera-2shards)
        # Its two shards pin themselves to the two cores.
        cmd=("$BIN/kythera" --listen "127.0.0.1:$port" --shards 2)
        pin=()
        ;;
    kythera-epoll) cmd=("$BIN/kythera" --listen "127.0.0.1:$port" --shards 1 --io epoll) ;;
    kythera-plain) cmd=("$BIN/kythera" --listen "127.0.0.1:$port" --shards 1 --plain-fds) ;;
    kythera-zc) cmd=("$BIN/kythera" --listen "127.0.0.1:$port" --shards 1 --send-zc-min-bytes 16384) ;;
    kythera-4k)
        cmd=("$BIN/kythera" --listen "127.0.0.1:$port" --shards 1 --recv-buffers-incremental false --recv-buffer-bytes 4096 --recv-buffers 1024)
        ;;
    # permessage-deflate (the client offers it, see run_load): the defaults (no context
    # takeover, compressors shared per shard), and context takeover both ways (a
    # compressor and a decompressor per connection).
    kythera-deflate) cmd=("$BIN/kythera" --listen "127.0.0.1:$port" --shards 1) ;;
    # wss:// (the plain listener beside it is not used).
    kythera-tls)
        cmd=("$BIN/kythera" --listen "127.0.0.1:$(free_port)" --shards 1 --tls-listen "127.0.0.1:$port"
            --tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem")
        ready="kythera listening on wss://"
        ;;
    fastwebsockets-tls)
        cmd=("$BIN/fastwebsockets-echo" --port "$port" --tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem")
        ready="listening on"
        ;;
    kythera-deflate-ctx)
        cmd=("$BIN/kythera" --listen "127.0.0.1:$port" --shards 1
            --deflate-server-no-context-takeover false --deflate-client-no-context-takeover false)
        ;;
    fastwebsockets)
        cmd=("$BIN/fastwebsockets-echo" --port "$port")
        [[ $FWS_HANDSHAKE == raw ]] && cmd+=(--raw-handshake)
        ready="listening on"
        ;;
    tungstenite)
        cmd=("$BIN/tungstenite-echo" --port "$port")
        ready="listening on"
        ;;
    epoll-floor | uring-floor)
        cmd=("$BIN/$name" --port "$port")
        ready="listening on"
        ;;
    esac
    if ((QUOTA_SERVERS)); then
        # Into the cgroup before it execs the server (its threads follow it there).
        cmd=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CGROUP" "${cmd[@]}")
    fi
    "${pin[@]}" "${cmd[@]}" >"$log" 2>&1 &
    SERVER_PID=$!
    for ((i = 0; i < 200; i++)); do
        if grep -q "$ready" "$log" 2>/dev/null; then
            SERVER_PORT=$(grep -m1 "$ready" "$log" | grep -oE '127\.0\.0\.1:[0-9]+' | head -1 | cut -d: -f2)
            SERVER_PORT=${SERVER_PORT:-$port}
            return 0
        fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            local st=0
            wait "$SERVER_PID" 2>/dev/null || st=$?
            SERVER_PID=""
            die "$name (${cmd[*]}) exited with status $st before it was ready: $(tail -n 20 "$log")"
        fi
        sleep 0.05
    done
    die "$name printed no '$ready' line within 10 s: $(tail -n 20 "$log")"
}

# Stops the server; returns 1 (after a warning) if it had died before.
end_server() {
    local name=$1 tag=$2 alive=0
    kill -0 "$SERVER_PID" 2>/dev/null && alive=1
    stop_pid "$SERVER_PID" 10
    SERVER_PID=""
    if ((alive == 0)); then
        warn "$name died during $tag: $(tail -n 10 "$LOGDIR/$tag.server.log")"
        return 1
    fi
}

# Appends one index line to runs.jsonl: test, server, repeat, file, exit status, etc.
index() { # test server repeat file rc extra-json
    echo "{\"test\":\"$1\",\"server\":\"$2\",\"repeat\":$3,\"file\":\"$4\",\"exit\":$5,\"loadavg1\":$(cut -d' ' -f1 /proc/loadavg)${6:+,$6}}" >>"$RUNS"
}

# One kythera-load run against a fresh server: $1 test (echo, memory, handshake),
# $2 server, $3 repeat, $4 tag, then kythera-load's arguments.
run_load() {
    local test=$1 name=$2 r=$3 tag=$4 rc=0 json deflate=()
    shift 4
    json="raw/$tag.json"
    [[ $name == kythera-deflate* ]] && deflate=(--deflate)
    start_server "$name" "$LOGDIR/$tag.server.log"
    server_url "$name"
    set +e
    taskset -c "$CLIENT_CPU" "$LOAD" "$@" "${deflate[@]}" --url "$URL" "${URL_ARGS[@]}" \
        --server-pid "$SERVER_PID" --json "$OUT/$json" -q >"$LOGDIR/$tag.client.log" 2>&1 &
    CLIENT_PIDS=($!)
    wait "${CLIENT_PIDS[0]}"
    rc=$?
    CLIENT_PIDS=()
    set -e
    if ! end_server "$name" "$tag" && ((rc == 0)); then
        rc=3
    fi
    if ((rc != 0)); then
        FAILED=$((FAILED + 1))
        warn "$tag failed (kythera-load exit $rc): $(tail -n 8 "$LOGDIR/$tag.client.log")"
    fi
    [[ -f $OUT/$json ]] || json=""
    index "$test" "$name" "$r" "$json" "$rc"
    [[ -n $json ]] && summary "$tag" "$OUT/$json"
    return 0
}

# One line on stderr per run.
summary() {
    python3 - "$1" "$2" >&2 <<'EOF'
import json, sys
j = json.load(open(sys.argv[2]))
n = lambda k: j.get(k) if j.get(k) is not None else float("nan")
if j["mode"] == "echo":
    lat = j.get("latency_us") or {}
    print("%-40s %9.0f msg/s  server %6.2f us/msg (%3.0f%% busy)  client %3.0f%%  others %5.2f cores  p50 %.0f us  p99 %.0f us"
          % (sys.argv[1], j["messages_per_sec"], n("server_cpu_us_per_msg"), 100 * n("server_cpu_util"),
             100 * n("client_cpu_util"), n("system_busy_cores") - n("server_cpu_util") - n("client_cpu_util"),
             lat.get("p50", float("nan")), lat.get("p99", float("nan"))))
else:
    mem = "  %8.0f B/idle conn" % n("server_rss_per_connection") if j["duration_secs"] > 0 else ""
    print("%-40s %6d/%d established  %8.0f handshakes/s  server %6.1f us/handshake%s"
          % (sys.argv[1], j["established"], j["connections"], j["handshakes_per_sec"],
             n("server_cpu_us_per_handshake"), mem))
EOF
}

kind_flag=(--kind "$KIND")
{
    echo "out: $OUT"
    echo "servers: $SERVERS; reference: $REFERENCE"
    [[ $ECHO == 1 ]] && echo "echo: connections {$CONNECTIONS} x size {$SIZES} x in flight {$INFLIGHT}, $KIND;" \
        "$REPEATS repeats; warm-up ${WARMUP}s, window ${DURATION}s; server on CPU $SERVER_CPU, client on CPU $CLIENT_CPU"
    [[ $MEMORY == 1 ]] && echo "memory: idle connections {$MEMORY_CONNECTIONS} held ${HOLD}s; kythera --shards 2: $SHARDS2_TARGET"
    [[ $HANDSHAKES == 1 ]] && echo "handshakes: $HANDSHAKE_CONNECTIONS connections, $REPEATS repeats"
    echo "open-file limit: $NOFILE; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >&2

# --- echo matrix -------------------------------------------------------------------
if [[ $ECHO == 1 ]]; then
    for conns in $CONNECTIONS; do
        for size in $SIZES; do
            for inflight in $INFLIGHT; do
                for ((r = 1; r <= REPEATS; r++)); do
                    for name in $SERVERS; do
                        run_load echo "$name" "$r" "echo-$name-c$conns-b$size-p$inflight-r$r" \
                            echo -c "$conns" -b "$size" -p "$inflight" "${kind_flag[@]}" \
                            --warmup "$WARMUP" -d "$DURATION" --connect-timeout 60
                    done
                done
            done
        done
    done
fi

# --- memory per idle connection ----------------------------------------------------
# kythera --shards 2 with SHARDS2_TARGET connections from several clients at once.
shards2() {
    local target=$1 tag clients k n left rc rss0 rss1 est
    tag="memory-kythera-2shards-c$target"
    local last=-1 same=0 count i files=() rcs=()
    clients=$(((target + PER_CLIENT - 1) / PER_CLIENT))
    start_server kythera-2shards "$LOGDIR/$tag.server.log"
    sleep 0.5
    rss0=$(awk '/^VmRSS/ {print $2}' "/proc/$SERVER_PID/status")
    left=$target
    CLIENT_PIDS=()
    for ((k = 0; k < clients; k++)); do
        n=$((left / (clients - k)))
        left=$((left - n))
        files+=("raw/$tag-client$k.json")
        # Each holds its connections long enough for the others to finish theirs.
        "$LOAD" connect -c "$n" --hold "$SHARDS2_HOLD" \
            --connect-timeout 60 --source-addrs "127.0.0.$((k + 1))" \
            --url "ws://127.0.0.1:$SERVER_PORT/echo" --json "$OUT/${files[k]}" -q \
            >"$LOGDIR/$tag-client$k.log" 2>&1 &
        CLIENT_PIDS+=($!)
    done
    # Wait until the server's established sockets stop growing (or reach the target).
    for ((i = 0; i < 240; i++)); do
        sleep 0.5
        count=$(ss -Htn state established "( sport = :$SERVER_PORT )" | wc -l)
        ((count >= target)) && break
        if ((count == last)); then
            ((++same >= 6)) && break
        else
            same=0
        fi
        last=$count
    done
    sleep 1
    rss1=$(awk '/^VmRSS/ {print $2}' "/proc/$SERVER_PID/status")
    count=$(ss -Htn state established "( sport = :$SERVER_PORT )" | wc -l)
    for p in "${CLIENT_PIDS[@]}"; do
        rc=0
        wait "$p" || rc=$?
        rcs+=("$rc")
    done
    CLIENT_PIDS=()
    end_server kythera-2shards "$tag" || FAILED=$((FAILED + 1))
    est=$(python3 -c 'import json, sys
print(sum(json.load(open(f)).get("established", 0) for f in sys.argv[1:]))' "${files[@]/#/$OUT/}" 2>/dev/null || echo 0)
    index memory-shards2 kythera-2shards 1 "" 0 \
        "\"connections\":$target,\"clients\":$clients,\"client_files\":[$(printf '"%s",' "${files[@]}" | sed 's/,$//')],\"client_exits\":[$(
            IFS=,
            echo "${rcs[*]}"
        )],\"established\":$est,\"server_sockets\":$count,\"rss_before_kib\":$rss0,\"rss_loaded_kib\":$rss1"
    echo "$(printf '%-40s' "$tag") $est/$target established ($count server sockets)  $(python3 -c "print(f'{($rss1 - $rss0) * 1024 / max($est, 1):.0f}')") B/idle conn" >&2
}

if [[ $MEMORY == 1 ]]; then
    for n in $MEMORY_CONNECTIONS; do
        for name in $SERVERS; do
            run_load memory "$name" 1 "memory-$name-c$n" connect -c "$n" --hold "$HOLD" --connect-timeout 60
        done
    done
    if ((SHARDS2_TARGET > 0)) && [[ " $SERVERS " == *" kythera "* ]]; then
        shards2 "$SHARDS2_TARGET"
    fi
fi

# --- handshake rate ----------------------------------------------------------------
if [[ $HANDSHAKES == 1 ]]; then
    if ((HANDSHAKE_CPU_QUOTA > 0)); then
        # cgroup v2 (cpu.max) or v1 (the cpu controller's cfs quota).
        if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
            CGROUP=/sys/fs/cgroup/kythera-bench-$$
            mkdir "$CGROUP" || die "cannot make $CGROUP (HANDSHAKE_CPU_QUOTA needs root)"
            echo "$((HANDSHAKE_CPU_QUOTA * 1000)) 100000" >"$CGROUP/cpu.max"
        else
            CGROUP=/sys/fs/cgroup/cpu/kythera-bench-$$
            mkdir "$CGROUP" || die "cannot make $CGROUP (HANDSHAKE_CPU_QUOTA needs root)"
            echo 100000 >"$CGROUP/cpu.cfs_period_us"
            echo "$((HANDSHAKE_CPU_QUOTA * 1000))" >"$CGROUP/cpu.cfs_quota_us"
        fi
        QUOTA_SERVERS=1
    fi
    for ((r = 1; r <= REPEATS; r++)); do
        for name in $SERVERS; do
            run_load handshake "$name" "$r" "handshake-$name-c$HANDSHAKE_CONNECTIONS-r$r" \
                connect -c "$HANDSHAKE_CONNECTIONS" --connect-timeout 60
        done
    done
    QUOTA_SERVERS=0
fi
# --- cluster -----------------------------------------------------------------------
if [[ $CLUSTER == 1 ]]; then
    if command -v redis-server >/dev/null; then
        if [[ $QUICK == 1 ]]; then
            export CLUSTER_REPEATS=${CLUSTER_REPEATS:-1} CLUSTER_DURATION=${CLUSTER_DURATION:-2}
            export CLUSTER_MEMBERS=${CLUSTER_MEMBERS:-3000}
        fi
        tools/bench-cluster.sh "$OUT/cluster" || {
            FAILED=$((FAILED + 1))
            warn "the cluster scenario failed (see $OUT/cluster)"
        }
    else
        warn "redis-server not found: no cluster scenario (apt-get install redis-server)"
    fi
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

# --- results.json and table.md -----------------------------------------------------
export QUICK SERVERS CONNECTIONS SIZES INFLIGHT KIND REPEATS WARMUP DURATION MEMORY_CONNECTIONS HOLD \
    SHARDS2_TARGET HANDSHAKE_CONNECTIONS HANDSHAKE_CPU_QUOTA FWS_HANDSHAKE
python3 - "$OUT" "$REFERENCE" "$MAX_OTHER_LOAD" "$SERVERS" <<'EOF'
import json, os, platform, statistics, subprocess, sys, time
out, ref, max_other, servers = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4].split()
runs = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl")) if l.strip()]
def load(r):
    return json.load(open(os.path.join(out, r["file"]))) if r.get("file") else None
nan = float("nan")
def med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else None
def ratio(a, b):
    return a / b if a is not None and b else None
def get(j, k):
    v = j.get(k)
    return v if v is not None else None

env = {k: os.environ.get(k) for k in
       ("QUICK", "SERVERS", "CONNECTIONS", "SIZES", "INFLIGHT", "KIND", "REPEATS", "WARMUP", "DURATION",
        "MEMORY_CONNECTIONS", "HOLD", "SHARDS2_TARGET", "HANDSHAKE_CONNECTIONS", "HANDSHAKE_CPU_QUOTA",
        "FWS_HANDSHAKE")}
def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "kernel": platform.release(), "cpu": cpu,
        "cpus": os.cpu_count(), "commit": cmd("git", "rev-parse", "--short", "HEAD"),
        "dirty": bool(cmd("git", "status", "--porcelain", "--untracked-files=no")),
        "reference": ref, "servers": servers, "env": {k: v for k, v in env.items() if v is not None}}

# Echo: medians per (cell, server) over the successful runs.
echo, cells, failed = [], [], []
by = {}
# Server CPU per message of each run by (cell, server, repeat), for paired ratios.
per_repeat = {}
for r in runs:
    if r["test"] != "echo":
        continue
    j = load(r)
    if r["exit"] != 0 or j is None:
        failed.append(r)
        continue
    cell = (j["connections"], j["bytes"], j["in_flight"])
    if cell not in cells:
        cells.append(cell)
    by.setdefault((cell, r["server"]), []).append(j)
    per_repeat[(cell, r["server"], r["repeat"])] = j.get("server_cpu_us_per_msg")
others = lambda j: (j["system_busy_cores"] - j["server_cpu_util"] - j["client_cpu_util"]
                    if None not in (j.get("system_busy_cores"), j.get("server_cpu_util"), j.get("client_cpu_util")) else None)
for cell in cells:
    for s in servers:
        js = by.get((cell, s))
        if not js:
            continue
        lat = lambda q: med([(j.get("latency_us") or {}).get(q) for j in js])
        echo.append({
            "server": s, "connections": cell[0], "bytes": cell[1], "in_flight": cell[2], "runs": len(js),
            "messages_per_sec": med([j["messages_per_sec"] for j in js]),
            "messages_per_sec_all": [j["messages_per_sec"] for j in js],
            "server_cpu_us_per_msg": med([get(j, "server_cpu_us_per_msg") for j in js]),
            "server_cpu_us_per_msg_all": [get(j, "server_cpu_us_per_msg") for j in js],
            "server_user_us_per_msg": med([get(j, "server_user_us_per_msg") for j in js]),
            "server_sys_us_per_msg": med([get(j, "server_sys_us_per_msg") for j in js]),
            "server_cpu_util": med([get(j, "server_cpu_util") for j in js]),
            "client_cpu_util": med([get(j, "client_cpu_util") for j in js]),
            "other_load_cores": med([others(j) for j in js]),
            "p50_us": lat("p50"), "p99_us": lat("p99"),
        })
def find(rows, s, **kw):
    return next((e for e in rows if e["server"] == s and all(e[k] == v for k, v in kw.items())), None)
for e in echo:
    if e["server"] == ref:
        continue
    r = find(echo, ref, connections=e["connections"], bytes=e["bytes"], in_flight=e["in_flight"])
    if r:
        e["ref_msgs_ratio"] = ratio(r["messages_per_sec"], e["messages_per_sec"])
        e["ref_cpu_ratio"] = ratio(r["server_cpu_us_per_msg"], e["server_cpu_us_per_msg"])

# Memory per idle connection.
memory = []
for r in runs:
    if r["test"] == "memory":
        j = load(r)
        if j is None:
            failed.append(r)
            continue
        if r["exit"] != 0:
            failed.append(r)
        memory.append({"server": r["server"], "connections": j["connections"], "established": j["established"],
                       "ok": r["exit"] == 0, "rss_before_kib": j.get("server_rss_before_kib"),
                       "rss_loaded_kib": j.get("server_rss_loaded_kib"),
                       "bytes_per_connection": j.get("server_rss_per_connection"),
                       "handshakes_per_sec": j.get("handshakes_per_sec")})
    elif r["test"] == "memory-shards2":
        est = r["established"]
        memory.append({"server": "kythera-2shards", "connections": r["connections"], "established": est,
                       "ok": est == r["connections"], "clients": r["clients"], "server_sockets": r["server_sockets"],
                       "rss_before_kib": r["rss_before_kib"], "rss_loaded_kib": r["rss_loaded_kib"],
                       "bytes_per_connection": (r["rss_loaded_kib"] - r["rss_before_kib"]) * 1024 / est if est else None})

# The marginal cost of one more idle connection: the slope of RSS between the two
# largest counts of a server, which leaves out fixed costs (receive buffer rings,
# thread stacks, allocator arenas) that the average above spreads over N.
slopes = []
for server in sorted({m["server"] for m in memory}):
    pts = sorted((m["established"], m["rss_loaded_kib"]) for m in memory
                 if m["server"] == server and m["ok"] and m.get("rss_loaded_kib") is not None)
    if len(pts) >= 2 and pts[-1][0] > pts[-2][0]:
        (n0, r0), (n1, r1) = pts[-2], pts[-1]
        slopes.append({"server": server, "from": n0, "to": n1,
                       "bytes_per_connection": (r1 - r0) * 1024 / (n1 - n0)})

# Handshakes.
handshakes, hs_by = [], {}
for r in runs:
    if r["test"] != "handshake":
        continue
    j = load(r)
    if r["exit"] != 0 or j is None:
        failed.append(r)
        continue
    hs_by.setdefault(r["server"], []).append(j)
for s in servers:
    js = hs_by.get(s)
    if js:
        handshakes.append({"server": s, "connections": js[0]["connections"], "runs": len(js),
                           "handshakes_per_sec": med([j["handshakes_per_sec"] for j in js]),
                           "handshakes_per_sec_all": [j["handshakes_per_sec"] for j in js],
                           "server_cpu_us_per_handshake": med([get(j, "server_cpu_us_per_handshake") for j in js]),
                           "p50_us": med([(j.get("handshake_latency_us") or {}).get("p50") for j in js])})
busy = [j for js in by.values() for j in js if (others(j) or 0) > max_other]
# Against the floors (issue 18): each driver over its own floor, kythera over the better
# of the two (the goal is at most 1.15 in every cell).
floors = []
for c, b, p in cells:
    at = lambda s: (find(echo, s, connections=c, bytes=b, in_flight=p) or {}).get("server_cpu_us_per_msg")
    uf, ef, k, ke = at("uring-floor"), at("epoll-floor"), at("kythera"), at("kythera-epoll")
    fws = at("fastwebsockets")
    if uf is None and ef is None:
        continue
    best = min(x for x in (uf, ef) if x is not None)
    # Paired: the median over repeats of one server's run over the other's in the same
    # repeat (the two ran minutes apart at most, so slow drifts of a noisy machine
    # cancel out, which a ratio of medians does not do).
    def paired(a, f):
        rs = [ratio(per_repeat.get(((c, b, p), a, i)), per_repeat.get(((c, b, p), f, i)))
              for i in sorted({k[2] for k in per_repeat if k[0] == (c, b, p)})]
        return med([x for x in rs if x is not None])
    # The same against the cheaper floor of each repeat.
    def paired_best():
        rs = []
        for i in sorted({k[2] for k in per_repeat if k[0] == (c, b, p)}):
            fl = [per_repeat.get(((c, b, p), f, i)) for f in ("uring-floor", "epoll-floor")]
            fl = [x for x in fl if x is not None]
            if fl:
                rs.append(ratio(per_repeat.get(((c, b, p), "kythera", i)), min(fl)))
        return med([x for x in rs if x is not None])
    floors.append({"connections": c, "bytes": b, "in_flight": p, "uring_floor": uf, "epoll_floor": ef,
                   "kythera": k, "kythera_epoll": ke,
                   "kythera_over_uring_floor": ratio(k, uf), "kythera_epoll_over_epoll_floor": ratio(ke, ef),
                   "kythera_over_best_floor": ratio(k, best),
                   "kythera_over_best_floor_paired": paired_best(),
                   # Issue 18's goals against fastwebsockets, and what the floor leaves of
                   # them: a goal below best_floor_over_fastwebsockets is out of reach for
                   # a server that does at least the floor's work.
                   "fastwebsockets": fws, "kythera_over_fastwebsockets": ratio(k, fws),
                   "best_floor_over_fastwebsockets": ratio(best, fws),
                   "kythera_over_uring_floor_paired": paired("kythera", "uring-floor"),
                   "kythera_epoll_over_epoll_floor_paired": paired("kythera-epoll", "epoll-floor")})
results = {"meta": meta, "echo": echo, "floors": floors, "memory": memory, "memory_slopes": slopes,
           "handshakes": handshakes, "failed_runs": failed, "busy_runs": len(busy)}
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=2)

# The markdown.
def f(x, p=2):
    return "n/a" if x is None or x != x else f"{x:,.{p}f}"
short = {"kythera": "kythera", "fastwebsockets": "fws", "tungstenite": "tungstenite"}
sn = lambda s: short.get(s, s)
others_s = [s for s in servers if s != ref]
L = []
reps = max([e["runs"] for e in echo] + [0])
if echo:
    L.append(f"### Echo: messages/s and server CPU per message\n")
    L.append(f"Medians over {reps} interleaved repeat(s); {env.get('KIND') or 'text'} messages; "
             f"{env.get('DURATION') or '5'} s windows after {env.get('WARMUP') or '2'} s of warm-up; "
             f"server pinned to one core, kythera-load to the other. "
             f"msgs ratio = {ref} msgs/s / other's (above 1: {ref} faster); "
             f"CPU ratio = {ref} CPU µs/msg / other's (below 1: {ref} cheaper).\n")
    head = ["connections", "payload", "in flight"]
    head += [f"{sn(s)} msgs/s" for s in servers] + [f"{sn(s)} CPU µs/msg" for s in servers]
    for s in others_s:
        head += [f"{sn(ref)}/{sn(s)} msgs", f"{sn(ref)}/{sn(s)} CPU"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "---|" * len(head))
    for c, b, p in cells:
        row = [f"{c:,}", f"{b:,} B" if b < 1024 else f"{b // 1024} KiB" if b % 1024 == 0 else f"{b:,} B", str(p)]
        es = {s: find(echo, s, connections=c, bytes=b, in_flight=p) for s in servers}
        row += [f((es[s] or {}).get("messages_per_sec"), 0) for s in servers]
        row += [f((es[s] or {}).get("server_cpu_us_per_msg")) for s in servers]
        for s in others_s:
            e = es[s] or {}
            row += [f(e.get("ref_msgs_ratio")), f(e.get("ref_cpu_ratio"))]
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    L.append("<details><summary>Per server: CPU split, utilisation, latency</summary>\n")
    L.append("| cell | server | msgs/s | CPU µs/msg (user + sys) | server busy | client busy | other load (cores) | p50 µs | p99 µs |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for c, b, p in cells:
        for s in servers:
            e = find(echo, s, connections=c, bytes=b, in_flight=p)
            if not e:
                continue
            pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"
            L.append(f"| {c} conns, {b} B, {p} in flight | {s} | {f(e['messages_per_sec'], 0)} | "
                     f"{f(e['server_cpu_us_per_msg'])} ({f(e['server_user_us_per_msg'])} + {f(e['server_sys_us_per_msg'])}) | "
                     f"{pct(e['server_cpu_util'])} | {pct(e['client_cpu_util'])} | {f(e['other_load_cores'])} | "
                     f"{f(e['p50_us'], 0)} | {f(e['p99_us'], 0)} |")
    L.append("\n</details>\n")
if floors:
    L.append("### Against the floors: server CPU per message over the floor's\n")
    L.append("uring-floor and epoll-floor do the least an echo can on each I/O method (benches/src/bin/); "
             "kythera / better floor is kythera (io_uring) over the cheaper of the two in the cell.\n")
    L.append("Ratios of medians; in brackets the median of the ratios of runs in the same repeat (paired).\n")
    with_fws = any(e["fastwebsockets"] is not None for e in floors)
    if with_fws:
        L.append("With fastwebsockets in the run: kythera / fws and better floor / fws (CPU per message); "
                 "a goal for kythera / fws below the floor's ratio cannot be met by a server that does at "
                 "least the floor's work.\n")
    L.append("| connections | payload | in flight | uring-floor µs | epoll-floor µs | kythera / uring-floor | "
             "kythera-epoll / epoll-floor | kythera / better floor |" +
             (" kythera / fws | better floor / fws |" if with_fws else ""))
    L.append("|---|---|---|---|---|---|---|---|" + ("---|---|" if with_fws else ""))
    for e in floors:
        b = e["bytes"]
        size = f"{b:,} B" if b < 1024 else f"{b // 1024} KiB" if b % 1024 == 0 else f"{b:,} B"
        L.append(f"| {e['connections']:,} | {size} | {e['in_flight']} | {f(e['uring_floor'])} | {f(e['epoll_floor'])} | "
                 f"{f(e['kythera_over_uring_floor'])} ({f(e['kythera_over_uring_floor_paired'])}) | "
                 f"{f(e['kythera_epoll_over_epoll_floor'])} ({f(e['kythera_epoll_over_epoll_floor_paired'])}) | "
                 f"{f(e['kythera_over_best_floor'])} ({f(e['kythera_over_best_floor_paired'])}) |" +
                 (f" {f(e['kythera_over_fastwebsockets'])} | {f(e['best_floor_over_fastwebsockets'])} |"
                  if with_fws else ""))
    L.append("")
if memory:
    L.append("### Memory per idle connection\n")
    L.append("Growth of the server's resident memory (VmRSS) with N idle, upgraded connections, divided by N "
             "(kernel socket memory not included). kythera-2shards: kythera --shards 2, connections from several "
             "kythera-load processes; the count is what it reached.\n")
    L.append("| server | connections | established | B/idle conn | RSS before → loaded |")
    L.append("|---|---|---|---|---|")
    for m in memory:
        mib = lambda k: "n/a" if m.get(k) is None else f"{m[k] / 1024:.1f}"
        L.append(f"| {m['server']} | {m['connections']:,} | {m['established']:,} | {f(m['bytes_per_connection'], 0)} | "
                 f"{mib('rss_before_kib')} → {mib('rss_loaded_kib')} MiB |")
    L.append("")
    if slopes:
        L.append("Marginal cost of one more idle connection (RSS slope between the two largest counts):\n")
        L.append("| server | between | B per added idle connection |")
        L.append("|---|---|---|")
        for sl in slopes:
            L.append(f"| {sl['server']} | {sl['from']:,} and {sl['to']:,} | {f(sl['bytes_per_connection'], 0)} |")
        L.append("")
if handshakes:
    L.append("### Handshakes\n")
    quota = int(env.get("HANDSHAKE_CPU_QUOTA") or 0)
    L.append("`kythera-load connect` (256 connects + handshakes in flight), fresh server per run; medians" +
             (f"; each server held to {quota}% of a core (a cgroup CPU quota), so the server is the limit"
              if quota else "") + ".\n")
    L.append("| server | connections | handshakes/s | server CPU µs/handshake | p50 handshake latency µs |" +
             f" {sn(ref)}/other rate |")
    L.append("|---|---|---|---|---|---|")
    rh = next((h for h in handshakes if h["server"] == ref), None)
    for h in handshakes:
        L.append(f"| {h['server']} | {h['connections']:,} | {f(h['handshakes_per_sec'], 0)} | "
                 f"{f(h['server_cpu_us_per_handshake'], 1)} | {f(h['p50_us'], 0)} | "
                 f"{'' if h is rh or not rh else f(ratio(rh['handshakes_per_sec'], h['handshakes_per_sec']))} |")
    L.append("")
L.append(f"Machine: {meta['cpu']}, {meta['cpus']} CPUs, Linux {meta['kernel']}; commit {meta['commit']}"
         f"{' (dirty)' if meta['dirty'] else ''}; {meta['date']}.")
if busy:
    L.append(f"\nWARNING: in {len(busy)} echo runs other processes used more than {max_other} cores: "
             "those figures are not from a quiet machine.")
if failed:
    L.append(f"\nFAILED runs (left out of the medians): {len(failed)}: " +
             ", ".join(f"{r['test']} {r['server']} {r.get('file') or ''} (exit {r['exit']})" for r in failed))
cluster_md = os.path.join(out, "cluster", "cluster.md")
if os.path.exists(cluster_md):
    L.append("")
    L.append(open(cluster_md).read())
text = "\n".join(L) + "\n"
open(os.path.join(out, "table.md"), "w").write(text)
print(text)
EOF

if [[ $CHARTS == 1 ]]; then
    if [[ -x $BIN/bench-chart ]]; then
        "$BIN/bench-chart" "$OUT" || warn "bench-chart failed"
    else
        warn "$BIN/bench-chart is missing: no charts"
    fi
fi
echo "results: $OUT (table.md, results.json, *.png, raw/)" >&2
((FAILED == 0)) || {
    echo "bench: $FAILED run(s) failed" >&2
    exit 1
}
