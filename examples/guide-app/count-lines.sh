#!/usr/bin/env bash
# Counts the code lines of the guide app's two versions (non-blank lines that are not only a
# `//` comment; both files use `//` comments only) and prints the table of docs/app-guide.md.
set -euo pipefail
cd "$(dirname "$0")"
count() { grep -cvE '^[[:space:]]*(//.*)?$' "$1"; }
count_toml() { grep -cvE '^[[:space:]]*(#.*)?$' "$1"; }
rust=$(count src/main.rs)
node=$(count server.js)
echo "| version | file | code lines |"
echo "|---|---|---|"
echo "| sc-rs (\`sc_worker::App\`) | examples/guide-app/src/main.rs | $rust |"
echo "| socketcluster-server 20 | examples/guide-app/server.js | $node |"
echo "| its config (sc-rs only; SocketCluster's is in server.js) | examples/guide-app/sc.toml | $(count_toml sc.toml) |"
if [ "$rust" -gt "$node" ]; then
  echo "sc-rs version is longer ($rust > $node)" >&2
  exit 1
fi
