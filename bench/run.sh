#!/usr/bin/env bash
# Runs sc-bench scenarios against sc-rs and the stock Node servers on this machine, in the same
# run, in interleaved rounds (every scenario against every server once per round, round after
# round) so that a noisy neighbour hurts every server alike, then draws the markdown table and
# the plots (bench/report.py).
#
#   bash bench/run.sh                    # the default set: fanout paced paced-wss idle idle-wss
#   bash bench/run.sh paced paced-wss    # some of: fanout paced paced-wss idle idle-wss
#                                        #   sweep narrow channels rpc connect
#   bash bench/run.sh all                # every scenario
#   REPEAT=5 bash bench/run.sh paced     # more rounds (default 3)
#
# Time: the default set takes about 10 minutes on 2 cores (3 rounds of about 3 minutes, plus the
# build). It is bounded: every run has a hard timeout (sc-bench's own, and `timeout` around it),
# and no new round starts after MAX_MINUTES (default 30) since the first one began.
#
# Servers (SERVERS overrides the plain ones, TLS_SERVERS the wss ones):
#   sc-rs-1w1b      sc-master with 1 worker + 1 broker (the balancer in front)
#   sc-rs           the default layout: 2 workers + 1 broker
#   uws             uWebSockets.js (peers/servers/uws-sc-lite.js): a floor, not a product
#   sc20            socketcluster-server 20, one process
#   sc14            socketcluster 14, 1 worker + 1 broker
#   sc-rs-1w1b-t1   as sc-rs-1w1b, with one runtime thread in the worker ([worker] threads = 1)
#   sc-rs-1w1b-proxy as sc-rs-1w1b, every connection proxied ([balancer] handoff = false)
#   sc-rs-1w1b-tls  as sc-rs-1w1b, TLS on the balancer ([balancer] tls_cert/tls_key); the
#                   sessions are handed off to the worker after the handshake
#   sc-rs-1w1b-tls-proxy as sc-rs-1w1b-tls, the sessions kept and proxied by the balancer
#                   ([balancer] tls_handoff = false)
#   sc-rs-1w1b-base as sc-rs-1w1b, with the release binaries in $BASELINE_BIN (another build,
#                   say the commit before a change, for a same-run before/after)
#   sc20-tls        socketcluster-server 20 behind Node's https server (bench/servers/sc20-https.js)
# Both TLS servers use the same certificate (a test CA made by sc-test-certs for this run).
# Results: bench/results/runs.jsonl (one JSON line per run), summary.md and *.png. Loopback
# only; every run is bounded by a message count and a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
RESULTS=${RESULTS:-$ROOT/bench/results}
REPEAT=${REPEAT:-3}
MAX_MINUTES=${MAX_MINUTES:-30}
SERVERS=${SERVERS:-"sc-rs-1w1b uws sc20"}
TLS_SERVERS=${TLS_SERVERS:-"sc-rs-1w1b-tls sc20-tls"}
SCENARIOS=${*:-fanout paced paced-wss idle idle-wss}
[ "$SCENARIOS" = all ] && SCENARIOS="fanout paced paced-wss idle idle-wss sweep narrow channels rpc connect"
# Spread clients over 4 loopback source addresses: the sc-rs balancer hashes by client IP, so
# this spreads them over its workers; the Node servers do not care.
SOURCE_IPS=4
mkdir -p "$RESULTS"
RUNS=$RESULTS/runs.jsonl
# A full run starts a fresh table; a partial one (scenarios named) adds to the last.
if [ $# -eq 0 ] && [ -f "$RUNS" ]; then mv "$RUNS" "$RESULTS/runs.previous.jsonl"; fi

step() { printf '\n==> %s\n' "$*" >&2; }

step "build (release)"
# One invocation: the same package set each time, so cargo's feature unification (and the
# cache) does not change between runs. sc-tests brings sc-test-certs.
cargo build --release --locked -p sc-master -p sc-balancer -p sc-worker -p sc-broker -p sc-bench \
  -p chat-example -p sc-tests --bins >&2
BENCH=$TARGET/release/sc-bench

step "test certificate (one CA and server certificate for both TLS servers)"
CERTS=$(mktemp -d)
"$TARGET/release/sc-test-certs" "$CERTS" "sc-rs bench"

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
# Our wrapper beside the kit's servers, so that it finds common.js and node_modules.
cp "$ROOT/bench/servers/sc20-https.js" "$PEERS/servers/"

SRV_PID=""
SRV_URL=""
SRV_GC=""
SRV_PROTO=2
SRV_LOG=$(mktemp)
trap 'stop_server; rm -f "$SRV_LOG"; rm -rf "$CERTS"' EXIT

# start_server NAME [rpc]: sets SRV_PID, SRV_URL, SRV_GC, SRV_PROTO, SRV_CA.
start_server() {
  local name=$1 rpc=${2:-}
  : > "$SRV_LOG"
  SRV_GC=""
  SRV_PROTO=2
  SRV_CA=()
  case $name in
    sc-rs|sc-rs-1w1b|sc-rs-1w1b-tls|sc-rs-1w1b-tls-proxy|sc-rs-1w1b-t1|sc-rs-1w1b-proxy|sc-rs-1w1b-base)
      # `tls` carries the extra environment of the variants too.
      local workers=2 tls=()
      [ "$name" != sc-rs ] && workers=1
      # Variants for the data-path settings: one runtime thread per daemon, or no hand-off
      # (every connection proxied by the balancer, as before issue 13).
      [ "$name" = sc-rs-1w1b-t1 ] && tls=(SC_WORKER__THREADS=1)
      [ "$name" = sc-rs-1w1b-proxy ] && tls=(SC_BALANCER__HANDOFF=false)
      if [ "$name" = sc-rs-1w1b-tls ] || [ "$name" = sc-rs-1w1b-tls-proxy ]; then
        tls=(SC_BALANCER__TLS_CERT="$CERTS/cert.pem" SC_BALANCER__TLS_KEY="$CERTS/key.pem")
        SRV_CA=(--ca "$CERTS/ca.pem")
      fi
      # TLS sessions kept by the balancer (proxied), as before they were handed off.
      [ "$name" = sc-rs-1w1b-tls-proxy ] && tls+=(SC_BALANCER__TLS_HANDOFF=false)
      local command="" bin=$TARGET/release
      [ "$name" = sc-rs-1w1b-base ] && bin=${BASELINE_BIN:?sc-rs-1w1b-base needs BASELINE_BIN}
      [ -n "$rpc" ] && command=$bin/sc-chat-worker
      env SC_BALANCER__LISTEN=127.0.0.1:0 SC_MASTER__ADMIN_LISTEN=127.0.0.1:0 \
        SC_CLUSTER__WORKERS=$workers SC_CLUSTER__BROKERS=1 RUST_LOG=warn "${tls[@]}" \
        ${command:+SC_WORKER__COMMAND=$command} \
        "$bin/sc-master" > "$SRV_LOG" 2>&1 &
      SRV_PID=$!
      wait_for 'cluster ready: ws'
      SRV_URL=$(grep -o 'wss\?://[^ ]*' "$SRV_LOG" | head -1)
      ;;
    sc20|sc14|uws)
      local port=$((8300 + RANDOM % 500)) script=$name
      [ "$name" = sc14 ] && SRV_PROTO=1
      [ "$name" = uws ] && script=uws-sc-lite
      node --expose-gc "$PEERS/servers/$script.js" "$port" > "$SRV_LOG" 2>&1 &
      SRV_PID=$!
      wait_for 'READY '
      SRV_URL=ws://127.0.0.1:$port/socketcluster/
      SRV_GC=http://127.0.0.1:$port/stats?gc=1
      ;;
    sc20-tls)
      local port=$((8300 + 2 * (RANDOM % 250)))
      node --expose-gc "$PEERS/servers/sc20-https.js" "$port" "$CERTS/cert.pem" "$CERTS/key.pem" > "$SRV_LOG" 2>&1 &
      SRV_PID=$!
      wait_for 'READY '
      # The certificate names localhost and 127.0.0.1.
      SRV_URL=wss://127.0.0.1:$port/socketcluster/
      SRV_GC=http://127.0.0.1:$((port + 1))/stats?gc=1
      SRV_CA=(--ca "$CERTS/ca.pem")
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
  if ! timeout 300 "$BENCH" --url "$SRV_URL" --pid "$SRV_PID" --protocol "$SRV_PROTO" "${SRV_CA[@]}" \
      --source-ips $SOURCE_IPS --label "$name" --quiet "$scenario" "$@" "${gc[@]}" >> "$RUNS"; then
    echo "  run failed: $name $scenario $*" >&2
  fi
  tail -1 "$RUNS" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("  ", {k: v for k, v in r["result"].items() if not isinstance(v, dict)}, file=sys.stderr)' || true
  stop_server
}

# servers_for SCENARIO: the wss scenarios run against the TLS servers, the others the plain ones.
servers_for() {
  case $1 in
    *-wss) echo "$TLS_SERVERS" ;;
    *) echo "$SERVERS" ;;
  esac
}

# run_one SCENARIO SERVER ROUND
run_one() {
  local scenario=$1 s=$2 i=$3
  case $scenario in
    # Burst: closed loop, as fast as the deliveries allow.
    fanout) bench "$s" fanout --subscribers 1000 --messages 500 --timeout 90 ;;
    # Paced, where real apps live: 1000 subscribers x 20 publishes/s (20k deliveries/s), 32-byte
    # payloads, 8 s; latency from every delivery to every subscriber.
    paced|paced-wss) bench "$s" fanout --subscribers 1000 --rate 20 --messages 160 --payload 32 --timeout 60 ;;
    idle|idle-wss) bench "$s" idle --connections 5000 --settle 3 ;;
    sweep)
      # Latency against rate: 1000 subscribers, 6 s per rate; deliveries/s = 1000 x rate.
      # Only round 1 runs the rates other than 20.
      rates="20"
      [ "$i" = 1 ] && rates="10 20 40 80 160"
      for r in $rates; do bench "$s" fanout --subscribers 1000 --rate "$r" --messages $((r * 6)) --timeout 60; done
      ;;
    # The same 20k deliveries/s as 100 subscribers x 200 msg/s: a fan-out 10 times narrower,
    # so each message's deliveries take a tenth of the time to write and read.
    narrow) bench "$s" fanout --subscribers 100 --rate 200 --messages 1200 --timeout 60 ;;
    channels) bench "$s" channels --sockets 1000 --rate 5000 --shared-rate 10 --duration 6 ;;
    rpc) bench "$s" rpc --clients 50 --inflight 1 --duration 5 ;;
    connect) bench "$s" connect --connections 3000 ;;
    *) echo "unknown scenario $scenario" >&2; exit 64 ;;
  esac
}

START=$(date +%s)
for i in $(seq 1 "$REPEAT"); do
  if [ $(( $(date +%s) - START )) -ge $((MAX_MINUTES * 60)) ]; then
    echo "MAX_MINUTES=$MAX_MINUTES reached: stopping after $((i - 1)) round(s)" >&2
    break
  fi
  step "round $i/$REPEAT: $SCENARIOS"
  round_start=$(date +%s)
  for scenario in $SCENARIOS; do
    for s in $(servers_for "$scenario"); do run_one "$scenario" "$s" "$i"; done
  done
  printf '==> round %d/%d done in %d s (total %d s, load %s)\n' "$i" "$REPEAT" \
    $(( $(date +%s) - round_start )) $(( $(date +%s) - START )) "$(cut -d' ' -f1-3 /proc/loadavg)" >&2
done

step "report"
"$VENV/bin/python" "$ROOT/bench/report.py" "$RUNS" "$RESULTS"
