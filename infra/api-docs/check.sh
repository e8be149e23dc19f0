#!/usr/bin/env bash
# `make api-docs-check`: starts a hub node (debug build, embedded defaults, a free loopback
# port), validates the OpenAPI document it serves at /api/openapi.json and docs/asyncapi.yaml
# with independent validators (check.mjs), then stops the node. Fails, never skips.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
command -v npm >/dev/null || { echo "api-docs: npm not found; install Node.js 18+ with npm" >&2; exit 1; }
npm ci --no-audit --no-fund --loglevel=error >/dev/null
(cd "$ROOT" && cargo build -q -p hub)

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
HUB_ADDR=127.0.0.1:$port HUB_JWT_SECRET=api-docs-check-secret-0123456789abcdef \
  HUB_API_KEY=api-docs-check-key HUB_LOG=warn "$ROOT/target/debug/hub" serve &
hub=$!
trap 'kill $hub 2>/dev/null; wait $hub 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break
  kill -0 $hub 2>/dev/null || { echo "api-docs: the hub exited at start" >&2; exit 1; }
  sleep 0.1
done
node check.mjs "http://127.0.0.1:$port/api/openapi.json" ${API_DOCS_EXTRA_URLS:-}
