#!/usr/bin/env bash
# Measures the balancer's memory per idle forwarded connection, plain and TLS.
#   bench/idle-memory.sh [CONNECTIONS] [plain|tls|both] [BALANCERS]   (default: 10000 both 1)
# Builds the release binaries, then runs sc-idle-memory (tests/src/bin/idle_memory.rs), which
# starts a whole cluster per mode, opens CONNECTIONS idle WebSocket connections through the
# balancer from 127.0.0.2, 127.0.0.3, ... (1,000 per source address) and prints the balancer's
# RSS growth per connection, read from /proc/<pid>/status. A balancer needs two descriptors per
# connection: it takes CAP_SYS_RESOURCE (root, outside a container that drops it) or a hard
# `ulimit -Hn` of at least 2 x CONNECTIONS / BALANCERS + 256.
# Results and how to read them: docs/balancer-memory.md.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release --locked -p sc-master -p sc-balancer -p sc-worker -p sc-broker -p sc-tests --bins
SC_TEST_BIN_DIR="$target/release" RUST_LOG="${RUST_LOG:-error}" \
  "$target/release/sc-idle-memory" "${1:-10000}" "${2:-both}" "${3:-1}"
