#!/usr/bin/env bash
# The one-node benchmarks of docs/benchmarks.md on the embedded backplane, run one after the
# other against a fresh node each: idle memory per connection and the JWT-verified connect
# rate (IDLE connections), then latency at CONNECTIONS connections and RATE notifications/s.
#
#   loadtest/bench/one-node.sh ws|sse [idle|latency|both]
#   Environment: IDLE (19000), CONNECTIONS (10000), RATE (10000), DURATION (20s),
#                PORT (9001), BIN_DIR (target/release: where hub and hub-loadgen are, e.g. a
#                previous build to compare with)
#
# Needs release builds (`cargo build --release -p hub -p loadtest`). Stops what it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRANSPORT=${1:?usage: one-node.sh ws|sse [idle|latency|both]}
WHAT=${2:-both}
IDLE=${IDLE:-19000} CONNECTIONS=${CONNECTIONS:-10000} RATE=${RATE:-10000} DURATION=${DURATION:-20s}
PORT=${PORT:-9001}
BIN=${BIN_DIR:-target/release}
[[ -x $BIN/hub && -x $BIN/hub-loadgen ]] || { echo "build first: cargo build --release -p hub -p loadtest" >&2; exit 1; }

export HUB_JWT_SECRET=benchsecretbenchsecretbenchsecret01 HUB_API_KEY=benchkeybenchkey01 HUB_LOG=warn
# One client address holds every connection here.
export HUB_MAX_CONNECTIONS_PER_IP=1000000
hub=""
cleanup() { [[ -n $hub ]] && { kill "$hub" 2>/dev/null || true; wait "$hub" 2>/dev/null || true; }; }
trap cleanup EXIT

start() {
  HUB_ADDR=127.0.0.1:$PORT $BIN/hub serve & hub=$!
  until curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.1; done
}
stop() { kill "$hub"; wait "$hub" 2>/dev/null || true; hub=""; }

if [[ $WHAT == idle || $WHAT == both ]]; then
  start
  echo "== idle: $IDLE $TRANSPORT connections"
  $BIN/hub-loadgen run --hub "http://127.0.0.1:$PORT" --jwt-secret "$HUB_JWT_SECRET" \
    --transport "$TRANSPORT" --connections "$IDLE" --rate 0 --duration 0s --hold 5s \
    --source-port-base 12000 --server-pid "$hub"
  stop
fi
if [[ $WHAT == latency || $WHAT == both ]]; then
  start
  echo "== latency: $CONNECTIONS $TRANSPORT connections, $RATE notifications/s for $DURATION"
  $BIN/hub-loadgen run --hub "http://127.0.0.1:$PORT" --jwt-secret "$HUB_JWT_SECRET" \
    --api-key "$HUB_API_KEY" --transport "$TRANSPORT" --connections "$CONNECTIONS" \
    --rate "$RATE" --duration "$DURATION" --hold 2s --source-port-base 12000 \
    --server-pid "$hub" --cpu-pid "hub=$hub"
  stop
fi
