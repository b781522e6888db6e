#!/usr/bin/env bash
# Runs every check and test of the project, as CI does:
#   1. formatting and clippy (-D warnings);
#   2. the Rust tests: unit tests, daemon tests and the cross-daemon tests in tests/e2e, which
#      start the real binaries (so the workspace is built first); tests/e2e/new_app.rs builds an
#      app made by `sc-master new` and drives it with the stock client of tests/compat;
#   3. the soak: 3 minutes of client churn on a real cluster with a worker and a broker killed
#      mid-run; fails if a daemon's RSS grows or channel counts stay up (sc-bench soak);
#   4. the client-compatibility tests in tests/compat: the stock npm socketcluster-client
#      (v14 and v20, pinned in its package-lock.json) against a real cluster;
#   5. the admin page in headless Chromium (tests/admin-page, playwright-core driving Debian's
#      chromium) against a real cluster;
#   6. the chat example's page in headless Chromium (tests/chat-page): two users chatting on the
#      stock socketcluster-client browser build, installed by `npm ci` in examples/chat.
# Needs cargo and Node.js 20 with npm; installs the npm packages it needs, and Debian's chromium
# when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "app guide: our version of the guide app is no longer than socketcluster-server 20's"
bash examples/guide-app/count-lines.sh

step "build"
cargo build --workspace --all-targets --locked

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "stock Node servers (reference peers for the sc-client tests)"
# The stock socketcluster 20 and 14 servers from shared/peers (beside the repository), installed
# into target/; without them those tests report themselves skipped (see the summary) and pass.
peers_src="$(pwd)/../shared/peers"
if [ -z "${SC_PEERS_DIR:-}" ] && [ -d "$peers_src" ] && command -v npm >/dev/null; then
  export SC_PEERS_DIR="${CARGO_TARGET_DIR:-$(pwd)/target}/peers"
  if [ ! -d "$SC_PEERS_DIR/node_modules" ]; then
    rm -rf "$SC_PEERS_DIR"
    cp -r "$peers_src" "$SC_PEERS_DIR"
    chmod -R u+w "$SC_PEERS_DIR"
    (cd "$SC_PEERS_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi
echo "SC_PEERS_DIR=${SC_PEERS_DIR:-unset}"

step "stock clients (tests/compat: also used by the Rust test of \`sc-master new\`)"
(cd tests/compat && npm ci --no-audit --no-fund --loglevel=error)

step "rust tests"
# Tests that cannot run here (no stock Node servers, no systemd-analyze, no network namespaces,
# ...) pass after printing `SKIPPED: <test>: <why>` and adding that line to this file; the
# summary at the end, pass or fail, lists them.
skipped="${CARGO_TARGET_DIR:-$(pwd)/target}/skipped-tests.txt"
rm -f "$skipped"
report_skipped() {
  local count=0
  [ -f "$skipped" ] && count=$(sort -u "$skipped" | wc -l)
  printf '\n==> skipped tests: %s\n' "$count"
  [ "$count" -eq 0 ] || sort -u "$skipped"
}
trap report_skipped EXIT
cargo test --workspace --locked

step "soak: no leak under churn (3 minutes)"
# The debug build of the last steps (sc-bench starts sc-master from its own folder); the
# 10-minute figures are in docs/security.md.
"${CARGO_TARGET_DIR:-target}/debug/sc-bench" --out "${CARGO_TARGET_DIR:-target}/soak.json" soak --duration 3m

step "stock client compatibility"
cd tests/compat
SC_TEST_BIN_DIR="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}/debug" npm test
cd ../..

step "admin page in headless Chromium"
install_chromium() {
  if ! command -v chromium >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
}
install_chromium
cd tests/admin-page
npm ci --no-audit --no-fund --loglevel=error
SC_TEST_BIN_DIR="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}/debug" CHROMIUM="$(command -v chromium)" npm test
cd ../..

step "chat example page in headless Chromium"
install_chromium
# The page's browser client (socketcluster-client, pinned by examples/chat/package-lock.json),
# which sc-chat-worker serves from examples/chat/node_modules.
(cd examples/chat && npm ci --no-audit --no-fund --loglevel=error)
cd tests/chat-page
npm ci --no-audit --no-fund --loglevel=error
SC_TEST_BIN_DIR="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}/debug" CHROMIUM="$(command -v chromium)" npm test
