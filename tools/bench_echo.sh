#!/usr/bin/env bash
# tools/bench_echo.sh: echo throughput and server CPU per message, kythera against
# fastwebsockets 0.10 (and optionally tokio-tungstenite 0.30), in the same run.
#
#   tools/bench_echo.sh                                   # kythera and fastwebsockets
#   SERVERS="fastwebsockets tungstenite" tools/bench_echo.sh
#   REPEATS=5 DURATION=10 tools/bench_echo.sh
#
# What it does: builds the release binaries (`kythera` from tools/ when asked for, and
# benches/src/bin: fastwebsockets-echo, tungstenite-echo, echo-load); then for every
# cell (CONNECTIONS x SIZES x INFLIGHT), every repeat and every server in turn
# (interleaved: r1 kythera, r1 fastwebsockets, r2 kythera, ...) it starts the server
# alone on a free loopback port pinned to SERVER_CPU (`taskset -c 0`; kythera with
# `--shards 1`), waits for its ready line, runs echo-load pinned to CLIENT_CPU
# (`taskset -c 1`) against ws://127.0.0.1:PORT/echo, then stops the server (SIGTERM,
# SIGKILL after 10 s).
#
# How CPU time is measured: echo-load gets the server's PID and reads the server's
# utime + stime (`/proc/PID/stat`, all threads, in clock ticks) and the sum of
# `/proc/PID/task/*/schedstat` (ns) itself, at the instants its measured window
# starts and ends: after the warm-up and after DURATION seconds, in the same loop
# iteration that freezes the message count. The messages, the server CPU and the
# client's own CPU (getrusage) thus cover the same window, without any signalling
# between processes. CPU per message = server CPU ticks in the window / echoes
# completed in the window. Each result line also carries both sides' utilisation and
# `system_busy_cores` (the whole machine, from /proc/stat). The table shows which side
# was at its core's limit (a client near 100% with the server below it means the
# client is the limit) and the "other load": busy CPU time that neither process was
# charged with. On a quiet machine that is near 0 (it holds softirq work that the
# kernel pushed to ksoftirqd, which belongs to the benchmark but to neither process);
# well above 0 means other jobs ran, and the script prints a warning (it is tick-
# sampled: a few hundredths below 0 is noise).
#
# Mind what "server CPU" holds on loopback: the sending task runs the receiving
# socket's TCP input (softirq in its own context), so the server is charged with
# delivering its echoes into the client's socket and the client with delivering its
# messages into the server's. Measured here that kernel part is ~3 µs per echo for
# every server (the `user + sys` column), which puts a floor under CPU per message and
# a ceiling (~300,000/s) on what one client core can drive.
#
# Output: a markdown table of medians over the repeats (messages/s, server CPU µs per
# message, and their ratios to fastwebsockets in the same cell), and every run as one
# JSON line in RESULTS (default target/bench-echo/echo-YYYYmmdd-HHMMSS.jsonl; the path
# is printed). Any failed handshake, wrong echo, connection error or server crash
# stops the script with an error and a non-zero status.
#
# Environment (defaults in brackets):
#   SERVERS       servers, in run order ["kythera fastwebsockets"]; also "tungstenite"
#                 and "kythera-plain" (kythera with plain fds, not direct descriptors),
#                 "kythera-zc" (zero-copy sends from 16 KiB)
#   CONNECTIONS   connection counts ["100 1000"]
#   SIZES         payload sizes in bytes ["20 512"]
#   INFLIGHT      messages in flight per connection ["1"]
#   KIND          text or binary [text]
#   REPEATS       repeats per server and cell [3]
#   WARMUP        seconds of warm-up before the window [2]
#   DURATION      seconds measured [5]
#   SERVER_CPU    core for the server [0]; CLIENT_CPU core for the client [1]
#   CLIENT_ENGINE echo-load's loop: epoll or tokio [epoll]
#   FWS_HANDSHAKE hyper (as fastwebsockets documents) or raw (no hyper) [hyper]
#   KYTHERA       the kythera binary to run [target/release/kythera, built here];
#                 when set, kythera is not built
#   BUSY_RETRIES  run a server/repeat again, up to this many times, when other jobs
#                 used more than MAX_OTHER_LOAD cores [0.15] during its window [0];
#                 only the last try is kept (its "tries" field counts them)
#   RESULTS       where to write the JSON lines
#   SKIP_BUILD=1  use the binaries already in target/release
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SERVERS=${SERVERS:-"kythera fastwebsockets"}
CONNECTIONS=${CONNECTIONS:-"100 1000"}
SIZES=${SIZES:-"20 512"}
INFLIGHT=${INFLIGHT:-"1"}
KIND=${KIND:-text}
REPEATS=${REPEATS:-3}
WARMUP=${WARMUP:-2}
DURATION=${DURATION:-5}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
CLIENT_ENGINE=${CLIENT_ENGINE:-epoll}
FWS_HANDSHAKE=${FWS_HANDSHAKE:-hyper}
BUSY_RETRIES=${BUSY_RETRIES:-0}
MAX_OTHER_LOAD=${MAX_OTHER_LOAD:-0.15}
RESULTS=${RESULTS:-target/bench-echo/echo-$(date +%Y%m%d-%H%M%S).jsonl}
BIN="$ROOT/target/release"
KYTHERA_BIN=${KYTHERA:-$BIN/kythera}
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/bench_echo.XXXXXX")

die() {
    echo "bench_echo: $*" >&2
    exit 1
}

for s in $SERVERS; do
    case $s in
    kythera | kythera-plain | kythera-zc | kythera-64k | fastwebsockets | tungstenite) ;;
    *) die "unknown server '$s' in SERVERS (kythera, kythera-plain, kythera-zc, fastwebsockets, tungstenite)" ;;
    esac
done
case $KIND in text | binary) ;; *) die "KIND is text or binary, not '$KIND'" ;; esac
case $FWS_HANDSHAKE in hyper | raw) ;; *) die "FWS_HANDSHAKE is hyper or raw" ;; esac
[[ $REPEATS =~ ^[1-9][0-9]*$ ]] || die "REPEATS must be a positive integer"
[[ $BUSY_RETRIES =~ ^[0-9]+$ ]] || die "BUSY_RETRIES must be a non-negative integer"
[[ $MAX_OTHER_LOAD =~ ^[0-9]*\.?[0-9]+$ ]] || die "MAX_OTHER_LOAD must be a number of cores"
command -v taskset >/dev/null || die "taskset not found (util-linux)"
command -v python3 >/dev/null || die "python3 not found (it computes the medians)"
ncpu=$(nproc --all)
((SERVER_CPU < ncpu && CLIENT_CPU < ncpu)) ||
    die "SERVER_CPU=$SERVER_CPU / CLIENT_CPU=$CLIENT_CPU: this machine has $ncpu CPUs"
[[ $SERVER_CPU != "$CLIENT_CPU" ]] || echo "bench_echo: warning: server and client share CPU $SERVER_CPU" >&2

# --- cleanup: whatever is running when the script ends, for any reason -------------
SERVER_PID=""
CLIENT_PID=""
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
        echo "bench_echo: pid $pid did not exit ${wait_s}s after SIGTERM; SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$CLIENT_PID" 2
    stop_pid "$SERVER_PID" 5
    if ((rc == 0)); then
        rm -rf "$LOGDIR"
    else
        echo "bench_echo: logs kept in $LOGDIR" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build -------------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    if [[ " $SERVERS " == *" kythera"* && -z ${KYTHERA:-} ]]; then
        echo "== cargo build --release -p tools --bin kythera -p benches --bins" >&2
        cargo build --release -p tools --bin kythera -p benches --bins ||
            die "build failed"
    else
        echo "== cargo build --release -p benches --bins" >&2
        cargo build --release -p benches --bins || die "build failed"
    fi
fi
for b in echo-load fastwebsockets-echo tungstenite-echo; do
    [[ -x $BIN/$b ]] || die "$BIN/$b is missing (build it, or unset SKIP_BUILD)"
done
if [[ " $SERVERS " == *" kythera"* ]]; then
    [[ -x $KYTHERA_BIN ]] || die "$KYTHERA_BIN is missing"
fi

mkdir -p "$(dirname "$RESULTS")"
: >"$RESULTS"

# A free loopback port: bound by the kernel's choice, then released for the server.
free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Starts server $1 pinned to SERVER_CPU; sets SERVER_PID and SERVER_PORT.
start_server() {
    local name=$1 log=$2 port cmd ready i
    port=$(free_port)
    case $name in
    kythera)
        cmd=("$KYTHERA_BIN" --listen "127.0.0.1:$port" --shards 1)
        ready="kythera listening on"
        ;;
    kythera-plain)
        # Plain file descriptors instead of direct descriptors, to compare the two.
        cmd=("$KYTHERA_BIN" --listen "127.0.0.1:$port" --shards 1 --plain-fds)
        ready="kythera listening on"
        ;;
    kythera-64k)
        # 256 receive buffers of 64 KiB instead of 1024 of 4 KiB.
        cmd=("$KYTHERA_BIN" --listen "127.0.0.1:$port" --shards 1 --recv-buffer-bytes 65536 --recv-buffers 256)
        ready="kythera listening on"
        ;;
    kythera-zc)
        # Zero-copy sends (IORING_OP_SEND_ZC) for sends of 16 KiB and more.
        cmd=("$KYTHERA_BIN" --listen "127.0.0.1:$port" --shards 1 --send-zc-min-bytes 16384)
        ready="kythera listening on"
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
    esac
    taskset -c "$SERVER_CPU" "${cmd[@]}" >"$log" 2>&1 &
    SERVER_PID=$!
    for ((i = 0; i < 200; i++)); do
        if grep -q "$ready" "$log" 2>/dev/null; then
            # The port the server says it listens on (the one we asked for).
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

# One run: server $1 started alone, echo-load with $2 connections, $3 bytes, $4 in
# flight (repeat $5); sets LINE (echo-load's JSON) and LOAD1, prints a summary line.
run_one() {
    local name=$1 conns=$2 size=$3 inflight=$4 r=$5 tag slog clog crc
    tag="${name}-c${conns}-s${size}-p${inflight}-r${r}"
    slog="$LOGDIR/$tag.server.log"
    clog="$LOGDIR/$tag.client.log"
    start_server "$name" "$slog"
    LOAD1=$(cut -d' ' -f1 /proc/loadavg)
    set +e
    taskset -c "$CLIENT_CPU" "$BIN/echo-load" \
        --url "ws://127.0.0.1:$SERVER_PORT/echo" \
        --connections "$conns" --size "$size" --inflight "$inflight" \
        "${kind_flag[@]}" --warmup "$WARMUP" --duration "$DURATION" \
        --engine "$CLIENT_ENGINE" --server-pid "$SERVER_PID" --json \
        >"$clog.out" 2>"$clog" &
    CLIENT_PID=$!
    wait "$CLIENT_PID"
    crc=$?
    CLIENT_PID=""
    set -e
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        die "$name died during $tag; server log: $(tail -n 20 "$slog"); client: $(tail -n 5 "$clog")"
    fi
    stop_pid "$SERVER_PID" 10
    SERVER_PID=""
    if ((crc != 0)); then
        die "echo-load failed against $name ($tag, exit $crc): $(tail -n 12 "$clog")"
    fi
    LINE=$(tail -n 1 "$clog.out")
    [[ $LINE == "{"* ]] || die "echo-load printed no JSON line ($tag): $(cat "$clog.out" "$clog")"
    python3 - "$LINE" "$tag" >&2 <<'EOF'
import json, sys
j = json.loads(sys.argv[1])
nan = float("nan")
print("%-34s %9.0f msg/s  server %5.2f us/msg (%3.0f%% busy)  client %3.0f%%  others %.2f cores  p50 %.0f us  p99 %.0f us"
      % (sys.argv[2], j["messages_per_sec"], j.get("server_cpu_us_per_msg", nan),
         100 * j.get("server_cpu_util", nan), 100 * j["client_cpu_util"],
         j.get("system_busy_cores", nan) - j.get("server_cpu_util", nan) - j["client_cpu_util"],
         j["p50_us"], j["p99_us"]))
EOF
}

kind_flag=()
[[ $KIND == binary ]] && kind_flag=(--binary)

echo "results: $RESULTS" >&2
echo "servers: $SERVERS; cells: connections {$CONNECTIONS} x size {$SIZES} x inflight {$INFLIGHT}, $KIND;" \
    "$REPEATS repeats; warm-up ${WARMUP}s, window ${DURATION}s; server on CPU $SERVER_CPU, client ($CLIENT_ENGINE) on CPU $CLIENT_CPU" >&2
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

for conns in $CONNECTIONS; do
    for size in $SIZES; do
        for inflight in $INFLIGHT; do
            for ((r = 1; r <= REPEATS; r++)); do
                for name in $SERVERS; do
                    for ((try = 0; ; try++)); do
                        run_one "$name" "$conns" "$size" "$inflight" "$r"
                        # Another job took CPU time in the window: run it again if allowed.
                        if ((try < BUSY_RETRIES)) && python3 -c '
import json, sys
j = json.loads(sys.argv[1])
o = j.get("system_busy_cores", 0) - j.get("server_cpu_util", 0) - j["client_cpu_util"]
sys.exit(0 if o > float(sys.argv[2]) else 1)' "$LINE" "$MAX_OTHER_LOAD"; then
                            echo "  (other load above $MAX_OTHER_LOAD cores: running it again)" >&2
                            continue
                        fi
                        break
                    done
                    echo "{\"server\":\"$name\",\"repeat\":$r,\"tries\":$((try + 1)),\"loadavg1\":$LOAD1,${LINE#\{}" >>"$RESULTS"
                done
            done
        done
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2

python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cells, servers = [], []
by = {}
for j in rows:
    cell = (j["connections"], j["size"], j["inflight"])
    if cell not in cells:
        cells.append(cell)
    if j["server"] not in servers:
        servers.append(j["server"])
    by.setdefault((cell, j["server"]), []).append(j)
med = lambda xs: statistics.median(xs) if xs else float("nan")
def limit(srv, cli):
    # Which side ran out of CPU: a side at >= 90% of its core that is clearly busier
    # than the other; neither when both are well below (other jobs took the CPUs).
    if srv != srv:
        return "?"
    if cli >= 0.9 and srv < cli - 0.05:
        return "client"
    if srv >= 0.9 and cli < srv - 0.05:
        return "server"
    if srv >= 0.9 and cli >= 0.9:
        return "both"
    return "neither"
def others(j):
    # CPU time (in cores) that neither the server nor the client used in the window.
    return j.get("system_busy_cores", float("nan")) - j.get("server_cpu_util", float("nan")) - j["client_cpu_util"]
def fmt(x, p=2):
    return "n/a" if x != x else f"{x:,.{p}f}"
print()
print(f"Medians over {max(j['repeat'] for j in rows)} interleaved repeats; {rows[0]['kind']} messages; "
      f"{rows[0]['duration_s']} s windows; client echo-load ({rows[0]['engine']}). "
      "Ratios are against fastwebsockets in the same cell (msgs/s: higher is better; CPU/msg: lower is better). "
      "'limited by': the side at >= 90% of its core and 5 points above the other (median utilisations); "
      "'both': both at >= 90%; 'neither': both waited, "
      "usually because other jobs held the CPUs; 'other load': CPU time (in cores, from /proc/stat) "
      "that neither the server nor the client used during the window.")
print()
print("| cell | server | msgs/s | server CPU µs/msg | msgs/s vs fws | CPU/msg vs fws | user + sys µs/msg | server busy | client busy | limited by | other load (cores) | p50 µs | p99 µs |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for cell in cells:
    base = by.get((cell, "fastwebsockets"), [])
    b_rate = med([j["messages_per_sec"] for j in base])
    b_cpu = med([j["server_cpu_us_per_msg"] for j in base if "server_cpu_us_per_msg" in j])
    for s in servers:
        rs = by.get((cell, s), [])
        if not rs:
            continue
        rate = med([j["messages_per_sec"] for j in rs])
        cpu = med([j["server_cpu_us_per_msg"] for j in rs if "server_cpu_us_per_msg" in j])
        c, size, p = cell
        srv = med([j.get("server_cpu_util", float("nan")) for j in rs])
        cli = med([j["client_cpu_util"] for j in rs])
        print(f"| {c} conns, {size} B, {p} in flight | {s} | {fmt(rate, 0)} | {fmt(cpu)} | "
              f"{fmt(rate / b_rate if base else float('nan'))} | {fmt(cpu / b_cpu if base else float('nan'))} | "
              f"{fmt(med([j.get('server_user_us_per_msg', float('nan')) for j in rs]))} + "
              f"{fmt(med([j.get('server_sys_us_per_msg', float('nan')) for j in rs]))} | "
              f"{fmt(100 * srv, 0)}% | {fmt(100 * cli, 0)}% | {limit(srv, cli)} | "
              f"{fmt(med([others(j) for j in rs]))} | "
              f"{fmt(med([j['p50_us'] for j in rs]), 0)} | {fmt(med([j['p99_us'] for j in rs]), 0)} |")
busy = [j for j in rows if others(j) > 0.15]
if busy:
    print()
    print(f"WARNING: in {len(busy)} of {len(rows)} runs other processes used more than 0.15 cores "
          f"(up to {max(others(j) for j in busy):.2f}): those figures are not from a quiet machine.")
print()
print(f"raw results: {sys.argv[1]}")
EOF
