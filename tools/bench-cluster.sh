#!/usr/bin/env bash
# tools/bench-cluster.sh OUT: the cluster scenario of tools/bench.sh (issue 15), also
# runnable alone. One Redis (Debian's redis-server) and three kythera nodes (one shard
# each, not pinned: five processes and the client on the machine's cores), all on
# loopback; results in OUT (cluster.json, cluster.md, raw/, logs/).
#
#   tools/bench-cluster.sh target/bench/cluster          # after cargo build --release --bins
#   CLUSTER_REPEATS=1 CLUSTER_DURATION=2 tools/bench-cluster.sh /tmp/c   # quick
#
# What it measures:
#   direct      `kythera-load direct` over the three nodes' /chat: connection i sends
#               chat direct messages to connection i+1, which is on the next node, so
#               every message is a cross-node send_message (client -> node A's chat
#               gear -> Redis -> node B -> client). For each of CLUSTER_DIRECT
#               (connections x messages in flight per sender): deliveries/s in all and
#               per node, latency p50 / p99 (client send to client receive); Redis
#               commands per message and bytes per message (the batches' bytes from the
#               nodes' /metrics, and Redis' own count of bytes it read, which adds RESP
#               framing and the liveness traffic) over the whole run.
#   broadcast   `kythera-load broadcast` with CLUSTER_MEMBERS subscribers of one chat
#               room spread over the three nodes, the publisher on the first, against
#               the same on one kythera without a cluster: deliveries/s end to end and
#               their ratio; Redis PUBLISH calls per publication (INFO commandstats
#               from the first publication to just before the last), as a range: all
#               PUBLISH calls, and those less one per script call (EVALSHA) in the
#               window, since each name and membership script publishes at most once.
#
# Environment: CLUSTER_REPEATS [3], CLUSTER_WARMUP [1], CLUSTER_DURATION [5],
# CLUSTER_DIRECT ["3x64 30x16 30x4 300x1"], CLUSTER_BYTES [64], CLUSTER_MEMBERS [10000].
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/bench-cluster.sh OUT}
REPEATS=${CLUSTER_REPEATS:-3}
WARMUP=${CLUSTER_WARMUP:-1}
DURATION=${CLUSTER_DURATION:-5}
DIRECT=${CLUSTER_DIRECT:-"3x64 30x16 30x4 300x1"}
BYTES=${CLUSTER_BYTES:-64}
MEMBERS=${CLUSTER_MEMBERS:-10000}
BIN=$(pwd)/target/release
mkdir -p "$OUT/raw" "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
RUNS="$OUT/runs.jsonl"
: >"$RUNS"
for b in kythera kythera-load; do [[ -x $BIN/$b ]] || { echo "bench-cluster: $BIN/$b missing" >&2; exit 2; }; done
command -v redis-server >/dev/null || { echo "bench-cluster: redis-server missing (apt-get install redis-server)" >&2; exit 2; }
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# Starts kythera with the arguments after $1 (its log); sets PORT and PID. (Not in a
# command substitution: its subshell would keep the pid from the cleanup.)
start_kythera() {
    local log=$1 i
    shift
    PORT=$(free_port)
    "$BIN/kythera" --listen "127.0.0.1:$PORT" "$@" >"$log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    for ((i = 0; i < 200; i++)); do
        grep -q "kythera listening on" "$log" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "bench-cluster: kythera did not start: $(tail -5 "$log")" >&2
    exit 2
}

metric() { # port series: the value, or 0
    curl -s "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s {print $2; found=1} END {if (!found) print 0}'
}
redis_stat() { # field of INFO commandstats / stats
    redis-cli -p "$REDIS_PORT" info all | tr -d '\r' | awk -F'[:=,]' -v f="$1" '
        $1 == "cmdstat_" f {print $3; found=1}
        $1 == f {print $2; found=1}
        END {if (!found) print 0}'
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/logs/redis.log" 2>&1 &
PIDS+=($!)
for ((i = 0; i < 100; i++)); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
NODE_PORTS=()
for n in 0 1 2; do
    start_kythera "$OUT/logs/node$n.log" --shards 1 \
        --cluster-redis "redis://127.0.0.1:$REDIS_PORT" --node-id "bench-$n"
    NODE_PORTS+=("$PORT")
done
URLS=$(printf 'ws://127.0.0.1:%s/chat,' "${NODE_PORTS[@]}" | sed 's/,$//')
echo "cluster: Redis on $REDIS_PORT, nodes on ${NODE_PORTS[*]}" >&2

sum_nodes() { # series: summed over the nodes
    local p t=0
    for p in "${NODE_PORTS[@]}"; do t=$(python3 -c "print($t + $(metric "$p" "$1"))"); done
    echo "$t"
}

for ((r = 1; r <= REPEATS; r++)); do
    for cfg in $DIRECT; do
        c=${cfg%x*}
        p=${cfg#*x}
        tag="direct-c$c-p$p-r$r"
        sent0=$(sum_nodes kythera_cluster_messages_sent_total)
        bytes0=$(sum_nodes kythera_cluster_bytes_sent_total)
        pub0=$(redis_stat publish)
        cmds0=$(redis_stat total_commands_processed)
        net0=$(redis_stat total_net_input_bytes)
        rc=0
        "$BIN/kythera-load" direct --url "$URLS" -c "$c" -p "$p" -b "$BYTES" --warmup "$WARMUP" \
            -d "$DURATION" --json "$OUT/raw/$tag.json" -q >"$OUT/logs/$tag.log" 2>&1 || rc=$?
        sent1=$(sum_nodes kythera_cluster_messages_sent_total)
        bytes1=$(sum_nodes kythera_cluster_bytes_sent_total)
        echo "{\"test\":\"direct\",\"tag\":\"$tag\",\"connections\":$c,\"in_flight\":$p,\"exit\":$rc,\"file\":\"raw/$tag.json\",\"sent\":$(python3 -c "print($sent1 - $sent0)"),\"batch_bytes\":$(python3 -c "print($bytes1 - $bytes0)"),\"redis_publish\":$(($(redis_stat publish) - pub0)),\"redis_commands\":$(($(redis_stat total_commands_processed) - cmds0)),\"redis_net_input\":$(($(redis_stat total_net_input_bytes) - net0))}" >>"$RUNS"
        grep -E "deliveries|latency  " "$OUT/logs/$tag.log" | sed "s/^/$tag /" >&2 || true
    done
    # Broadcast across the nodes, then on one kythera alone.
    tag="broadcast-cluster-c$MEMBERS-r$r"
    "$BIN/kythera-load" broadcast --url "$URLS" -c "$MEMBERS" -b "$BYTES" --warmup "$WARMUP" \
        -d "$DURATION" --connect-timeout 60 --json "$OUT/raw/$tag.json" -q >"$OUT/logs/$tag.log" 2>&1 &
    load=$!
    # Counted from the first publication (the joins' scripts are done by then) until
    # half a second before the publisher stops (the leaves' scripts come after): it
    # publishes for the warm-up and the window.
    in0=$(metric "${NODE_PORTS[0]}" 'kythera_frames_in_total{gear="/chat"}')
    for ((i = 0; i < 1200; i++)); do
        [[ $(metric "${NODE_PORTS[0]}" 'kythera_frames_in_total{gear="/chat"}') != "$in0" ]] && break
        sleep 0.02
    done
    redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
    in0=$(metric "${NODE_PORTS[0]}" 'kythera_frames_in_total{gear="/chat"}')
    ev0=$(metric "${NODE_PORTS[0]}" kythera_cluster_events_received_total)
    sleep "$(python3 -c "print(max(0.2, $WARMUP + $DURATION - 0.5))")"
    in1=$(metric "${NODE_PORTS[0]}" 'kythera_frames_in_total{gear="/chat"}')
    publish=$(redis_stat publish)
    evalsha=$(redis_stat evalsha)
    ev1=$(metric "${NODE_PORTS[0]}" kythera_cluster_events_received_total)
    rc=0
    wait "$load" || rc=$?
    echo "{\"test\":\"broadcast\",\"tag\":\"$tag\",\"cluster\":true,\"exit\":$rc,\"file\":\"raw/$tag.json\",\"publications\":$(python3 -c "print(int($in1 - $in0))"),\"redis_publish\":$publish,\"redis_evalsha\":$evalsha,\"events\":$(python3 -c "print(int($ev1 - $ev0))")}" >>"$RUNS"
    grep -E "deliveries|latency  " "$OUT/logs/$tag.log" | sed "s/^/$tag /" >&2 || true
    tag="broadcast-single-c$MEMBERS-r$r"
    start_kythera "$OUT/logs/$tag.server.log" --shards 1
    port=$PORT
    single=$PID
    rc=0
    "$BIN/kythera-load" broadcast --url "ws://127.0.0.1:$port/chat" -c "$MEMBERS" -b "$BYTES" \
        --warmup "$WARMUP" -d "$DURATION" --connect-timeout 60 --json "$OUT/raw/$tag.json" -q \
        >"$OUT/logs/$tag.log" 2>&1 || rc=$?
    kill -TERM "$single"
    wait "$single" 2>/dev/null || true
    echo "{\"test\":\"broadcast\",\"tag\":\"$tag\",\"cluster\":false,\"exit\":$rc,\"file\":\"raw/$tag.json\"}" >>"$RUNS"
    grep -E "deliveries|latency  " "$OUT/logs/$tag.log" | sed "s/^/$tag /" >&2 || true
done

CLUSTER_MEMBERS=$MEMBERS python3 - "$OUT" <<'EOF'
import json, os, statistics, sys
out = sys.argv[1]
runs = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl")) if l.strip()]
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def load(r):
    p = os.path.join(out, r["file"])
    return json.load(open(p)) if os.path.exists(p) else None
failed = [r["tag"] for r in runs if r["exit"] != 0]
direct, cells = [], []
for r in runs:
    if r["test"] == "direct" and r["exit"] == 0 and (r["connections"], r["in_flight"]) not in cells:
        cells.append((r["connections"], r["in_flight"]))
for c, p in cells:
    rs = [(r, load(r)) for r in runs if r["test"] == "direct" and r["exit"] == 0
          and (r["connections"], r["in_flight"]) == (c, p)]
    rs = [(r, j) for r, j in rs if j]
    per = lambda k: med([r[k] / r["sent"] for r, _ in rs if r["sent"]])
    direct.append({
        "connections": c, "in_flight": p, "runs": len(rs),
        "messages_per_sec": med([j["messages_per_sec"] for _, j in rs]),
        "messages_per_sec_per_node": med([j["messages_per_sec"] / 3 for _, j in rs]),
        "p50_us": med([j["latency_us"]["p50"] for _, j in rs]),
        "p99_us": med([j["latency_us"]["p99"] for _, j in rs]),
        "redis_publish_per_msg": per("redis_publish"),
        "redis_commands_per_msg": per("redis_commands"),
        "batch_bytes_per_msg": per("batch_bytes"),
        "redis_net_input_bytes_per_msg": per("redis_net_input"),
    })
bc = {}
for r in runs:
    if r["test"] == "broadcast" and r["exit"] == 0:
        j = load(r)
        if j:
            bc.setdefault(r["cluster"], []).append((r, j))
def bsum(key):
    rs = bc.get(key, [])
    return {"runs": len(rs), "deliveries_per_sec": med([j["messages_per_sec"] for _, j in rs]),
            "p50_us": med([j["latency_us"]["p50"] for _, j in rs]), "p99_us": med([j["latency_us"]["p99"] for _, j in rs]),
            # PUBLISH calls that carried publications, per publication: between all
            # PUBLISH calls and those less one per script call (a script publishes at
            # most one message, carrying all the name and membership events of its
            # batch). Publications of the same flush share one PUBLISH, so below 1 is
            # possible.
            "publish_per_publication_low": med([(r["redis_publish"] - r["redis_evalsha"]) / r["publications"]
                                                for r, _ in rs if r.get("publications")]) if key else None,
            "publish_per_publication_high": med([r["redis_publish"] / r["publications"]
                                                 for r, _ in rs if r.get("publications")]) if key else None,
            "events_during_publishing": med([r["events"] for r, _ in rs]) if key else None,
            "evalsha_during_publishing": med([r["redis_evalsha"] for r, _ in rs]) if key else None}
broadcast = {"cluster": bsum(True), "single": bsum(False)}
ratio = None
if broadcast["cluster"]["deliveries_per_sec"] and broadcast["single"]["deliveries_per_sec"]:
    ratio = broadcast["cluster"]["deliveries_per_sec"] / broadcast["single"]["deliveries_per_sec"]
broadcast["cluster_over_single"] = ratio
json.dump({"direct": direct, "broadcast": broadcast, "failed": failed}, open(os.path.join(out, "cluster.json"), "w"), indent=2)
f = lambda x, p=0: "n/a" if x is None else f"{x:,.{p}f}"
L = ["### Cluster: three nodes and one Redis on this machine\n",
     "Direct messages (`kythera-load direct`, every message crosses nodes), medians over the repeats; "
     "per message: Redis commands and bytes over the whole run.\n",
     "| connections x in flight | msgs/s (all) | msgs/s per node | p50 µs | p99 µs | PUBLISH per msg | Redis commands per msg | batch bytes per msg | Redis input bytes per msg |",
     "|---|---|---|---|---|---|---|---|---|"]
for d in direct:
    L.append(f"| {d['connections']} x {d['in_flight']} | {f(d['messages_per_sec'])} | {f(d['messages_per_sec_per_node'])} | "
             f"{f(d['p50_us'])} | {f(d['p99_us'])} | {f(d['redis_publish_per_msg'], 3)} | {f(d['redis_commands_per_msg'], 3)} | "
             f"{f(d['batch_bytes_per_msg'], 1)} | {f(d['redis_net_input_bytes_per_msg'], 1)} |")
c, s = broadcast["cluster"], broadcast["single"]
L += ["", "Publish to one room (`kythera-load broadcast`, one publisher), members spread over three nodes or on one:\n",
      "| members | where | deliveries/s | p50 µs | p99 µs | Redis PUBLISH per publication |", "|---|---|---|---|---|---|",
      f"| {os.environ.get('CLUSTER_MEMBERS', '10000')} | 3 nodes | {f(c['deliveries_per_sec'])} | {f(c['p50_us'])} | {f(c['p99_us'])} | {f(c['publish_per_publication_low'], 2)} to {f(c['publish_per_publication_high'], 2)} |",
      f"| {os.environ.get('CLUSTER_MEMBERS', '10000')} | 1 node | {f(s['deliveries_per_sec'])} | {f(s['p50_us'])} | {f(s['p99_us'])} | |",
      "", f"3 nodes / 1 node deliveries: {f(ratio, 2)}. While publishing: {f(c['evalsha_during_publishing'])} EVALSHA calls "
      f"carrying {f(c['events_during_publishing'])} name and membership events; a script call publishes at most once, "
      "hence the range of PUBLISH calls per publication.", ""]
if failed:
    L.append(f"FAILED runs: {', '.join(failed)}\n")
text = "\n".join(L) + "\n"
open(os.path.join(out, "cluster.md"), "w").write(text)
print(text)
EOF
[[ ! -s "$RUNS" ]] || ! grep -q '"exit":[1-9]' "$RUNS"
