#!/usr/bin/env bash
# The broadcast benchmark (docs/benchmarks.md): a private Redis, two hub nodes on it,
# CONNECTIONS subscribers of one channel (their tokens' `channels` claim), half on each node,
# RATE channel publishes/s through the HTTP API of node B (`{"channel": ...}`): every publish
# is delivered to every subscriber. Reports deliveries/s, latency, loss, duplicates and order
# per subscriber, and server CPU per delivery split by process (node A, node B, Redis).
#
#   loadtest/bench/broadcast.sh TRANSPORT [extra hub-loadgen args...]
#     TRANSPORT  ws | sse | mixed
#   Environment: CONNECTIONS (10000), RATE (10: channel publishes/s), DURATION (20s),
#                MODE (http | batch | grpc), BATCH (10), REDIS_PORT (6391), PORT_A (9121),
#                PORT_B (9122), GRPC_B (9222), BIN_DIR (target/release)
#
# Needs release builds (`cargo build --release -p hub -p loadtest`) and redis-server. Stops
# everything it started, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRANSPORT=${1:?usage: broadcast.sh ws|sse|mixed}
shift
CONNECTIONS=${CONNECTIONS:-10000} RATE=${RATE:-10} DURATION=${DURATION:-20s}
MODE=${MODE:-http} BATCH=${BATCH:-10}
REDIS_PORT=${REDIS_PORT:-6391} PORT_A=${PORT_A:-9121} PORT_B=${PORT_B:-9122} GRPC_B=${GRPC_B:-9222}
BIN=${BIN_DIR:-target/release}
NODE_B_ENV="HUB_GRPC_ADDR=127.0.0.1:$GRPC_B"
# shellcheck source=loadtest/bench/two-nodes.sh
source loadtest/bench/two-nodes.sh

args=(--publish-mode "$MODE")
[[ $MODE == batch ]] && args+=(--batch-size "$BATCH")
via=(--publish-via "http://127.0.0.1:$PORT_B")
[[ $MODE == grpc ]] && via=(--publish-via "http://127.0.0.1:$GRPC_B")
"$BIN/hub-loadgen" run --hub "http://127.0.0.1:$PORT_A" --hub "http://127.0.0.1:$PORT_B" "${via[@]}" \
  --scenario broadcast --channel-rate "$RATE" \
  --jwt-secret "$HUB_JWT_SECRET" --api-key "$HUB_API_KEY" --transport "$TRANSPORT" \
  --connections "$CONNECTIONS" --duration "$DURATION" --hold 3s --drain 5s \
  --source-port-base 18000 --server-pid "$a" --server-pid "$b" \
  --cpu-pid "node-a=$a" --cpu-pid "node-b=$b" --cpu-pid "redis=$redis" "${args[@]}" "$@"
