#!/usr/bin/env bash
# Runs every check and test of the project, as CI does:
#   1. formatting and clippy (-D warnings);
#   2. the Rust tests: unit tests, daemon tests and the cross-daemon tests in tests/e2e, which
#      start the real binaries (so the workspace is built first);
#   3. the client-compatibility tests in tests/compat: the stock npm socketcluster-client
#      (v14 and v20, pinned in its package-lock.json) against a real cluster.
# Needs cargo and Node.js 20 with npm; installs the npm packages it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "build"
cargo build --workspace --all-targets --locked

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "rust tests"
cargo test --workspace --locked

step "stock client compatibility"
cd tests/compat
npm ci --no-audit --no-fund --loglevel=error
SC_TEST_BIN_DIR="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}/debug" npm test
