#!/usr/bin/env bash
# Runs sc-bench scenarios against sc-rs and the stock Node servers on this machine, in the same
# run, interleaved (A B C D, A B C D, ...) so that a noisy neighbour hurts every server alike,
# then draws the table and the plots (bench/report.py).
#
#   bash bench/run.sh                 # every scenario (about 20 minutes on 2 cores)
#   bash bench/run.sh fanout idle     # some of: fanout sweep narrow channels rpc idle connect
#   REPEAT=5 bash bench/run.sh fanout # more repeats (default 3)
#
# Servers: sc-rs-1w1b (sc-master with 1 worker + 1 broker), sc-rs (the default layout: 2 workers
# + 1 broker), sc20 (socketcluster-server 20, one process) and sc14 (socketcluster 14, 1 worker +
# 1 broker). Results: bench/results/runs.jsonl (one JSON line per run), summary.md and *.png.
# Loopback only; every run is bounded by a message count and a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
RESULTS=$ROOT/bench/results
REPEAT=${REPEAT:-3}
SERVERS=${SERVERS:-"sc-rs-1w1b sc-rs sc20 sc14"}
SCENARIOS=${*:-fanout sweep narrow channels rpc idle connect}
# Spread clients over 4 loopback source addresses: the sc-rs balancer hashes by client IP, so
# this spreads them over its workers; the Node servers do not care.
SOURCE_IPS=4
mkdir -p "$RESULTS"
RUNS=$RESULTS/runs.jsonl
# A full run starts a fresh table; a partial one (scenarios named) adds to the last.
if [ $# -eq 0 ] && [ -f "$RUNS" ]; then mv "$RUNS" "$RESULTS/runs.previous.jsonl"; fi

step() { printf '\n==> %s\n' "$*" >&2; }

step "build (release)"
cargo build --release --locked -p sc-master -p sc-balancer -p sc-worker -p sc-broker -p sc-bench -p chat-example >&2
BENCH=$TARGET/release/sc-bench

step "python with matplotlib (a venv under the target dir)"
VENV=$TARGET/bench-venv
if ! "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet matplotlib
fi

step "stock Node servers"
PEERS=${SC_PEERS_DIR:-$TARGET/peers}
if [ ! -d "$PEERS/node_modules" ]; then
  rm -rf "$PEERS"
  cp -r "$ROOT/../shared/peers" "$PEERS"
  chmod -R u+w "$PEERS"
  (cd "$PEERS" && npm ci --no-audit --no-fund --loglevel=error)
fi

SRV_PID=""
SRV_URL=""
SRV_GC=""
SRV_PROTO=2
SRV_LOG=$(mktemp)
trap 'stop_server; rm -f "$SRV_LOG"' EXIT

# start_server NAME [rpc]: sets SRV_PID, SRV_URL, SRV_GC, SRV_PROTO.
start_server() {
  local name=$1 rpc=${2:-}
  : > "$SRV_LOG"
  SRV_GC=""
  SRV_PROTO=2
  case $name in
    sc-rs|sc-rs-1w1b)
      local workers=2
      [ "$name" = sc-rs-1w1b ] && workers=1
      local command=""
      [ -n "$rpc" ] && command=$TARGET/release/sc-chat-worker
      env SC_BALANCER__LISTEN=127.0.0.1:0 SC_MASTER__ADMIN_LISTEN=127.0.0.1:0 \
        SC_CLUSTER__WORKERS=$workers SC_CLUSTER__BROKERS=1 RUST_LOG=warn \
        ${command:+SC_WORKER__COMMAND=$command} \
        "$TARGET/release/sc-master" > "$SRV_LOG" 2>&1 &
      SRV_PID=$!
      wait_for 'cluster ready: ws://'
      SRV_URL=$(grep -o 'ws://[^ ]*' "$SRV_LOG" | head -1)
      ;;
    sc20|sc14)
      local port=$((8300 + RANDOM % 500))
      [ "$name" = sc14 ] && SRV_PROTO=1
      node --expose-gc "$PEERS/servers/$name.js" "$port" > "$SRV_LOG" 2>&1 &
      SRV_PID=$!
      wait_for 'READY '
      SRV_URL=ws://127.0.0.1:$port/socketcluster/
      SRV_GC=http://127.0.0.1:$port/stats?gc=1
      ;;
    *) echo "unknown server $name" >&2; exit 64 ;;
  esac
}

wait_for() {
  for _ in $(seq 1 300); do
    grep -q "$1" "$SRV_LOG" && return 0
    kill -0 "$SRV_PID" 2>/dev/null || { cat "$SRV_LOG" >&2; echo "server exited" >&2; exit 1; }
    sleep 0.1
  done
  cat "$SRV_LOG" >&2
  echo "server not ready in 30 s" >&2
  exit 1
}

# SIGTERM the server's whole process tree (sc14 forks several), SIGKILL what is left after 5 s.
stop_server() {
  [ -n "$SRV_PID" ] || return 0
  local pids
  pids=$(tree "$SRV_PID")
  kill $pids 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 $pids 2>/dev/null || break
    sleep 0.1
  done
  kill -9 $pids 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  SRV_PID=""
}

tree() {
  local all=$1 kids
  kids=$(ps -o pid= --ppid "$1" 2>/dev/null || true)
  for k in $kids; do all="$all $(tree "$k")"; done
  echo "$all"
}

# bench NAME SCENARIO ARGS...: one run of sc-bench against a fresh server; appends to runs.jsonl.
bench() {
  local name=$1 scenario=$2
  shift 2
  local rpc=""
  [ "$scenario" = rpc ] && rpc=1
  start_server "$name" $rpc
  sleep 1
  echo "+ $name $scenario $* (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  local gc=()
  [ "$scenario" = idle ] && [ -n "$SRV_GC" ] && gc=(--gc-url "$SRV_GC")
  if ! timeout 300 "$BENCH" --url "$SRV_URL" --pid "$SRV_PID" --protocol "$SRV_PROTO" \
      --source-ips $SOURCE_IPS --label "$name" --quiet "$scenario" "$@" "${gc[@]}" >> "$RUNS"; then
    echo "  run failed: $name $scenario $*" >&2
  fi
  tail -1 "$RUNS" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("  ", {k: v for k, v in r["result"].items() if not isinstance(v, dict)}, file=sys.stderr)' || true
  stop_server
}

for scenario in $SCENARIOS; do
  step "$scenario"
  for i in $(seq 1 "$REPEAT"); do
    for s in $SERVERS; do
      case $scenario in
        fanout) bench "$s" fanout --subscribers 1000 --messages 1000 --timeout 90 ;;
        sweep)
          # Latency against rate: 1000 subscribers, 6 s per rate; deliveries/s = 1000 x rate.
          # 20 msg/s (20k deliveries/s) is sustained by every server; only the repeat 1 runs the rest.
          rates="20"
          [ "$i" = 1 ] && rates="10 20 40 80 160"
          for r in $rates; do bench "$s" fanout --subscribers 1000 --rate "$r" --messages $((r * 6)) --timeout 60; done
          ;;
        # The same 20k deliveries/s as 100 subscribers x 200 msg/s: a fan-out 10 times narrower,
        # so each message's deliveries take a tenth of the time to write and read.
        narrow) bench "$s" fanout --subscribers 100 --rate 200 --messages 1200 --timeout 60 ;;
        channels) bench "$s" channels --sockets 1000 --rate 5000 --shared-rate 10 --duration 6 ;;
        rpc) bench "$s" rpc --clients 50 --inflight 1 --duration 5 ;;
        idle) bench "$s" idle --connections 5000 --settle 3 ;;
        connect) bench "$s" connect --connections 3000 ;;
        *) echo "unknown scenario $scenario" >&2; exit 64 ;;
      esac
    done
  done
done

step "report"
"$VENV/bin/python" "$ROOT/bench/report.py" "$RUNS" "$RESULTS"
