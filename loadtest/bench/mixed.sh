#!/usr/bin/env bash
# The mixed-streams benchmark (docs/benchmarks.md): a private Redis, two hub nodes on it,
# CONNECTIONS connections (half on each node), each listening to its user's personal stream,
# the shared channel and its group's channel (CHANNEL_GROUPS groups); RATE personal notifications/s
# and CHANNEL_RATE publishes/s to each channel, interleaved, through node B. RESUME of the
# connections drop mid-run, stay away OFFLINE and come back on the other node with the last
# envelope id they saw (WS since=, SSE Last-Event-ID). Every stream is checked per
# connection: each notification once, in order, across the resume; hub.gap reported.
#
#   loadtest/bench/mixed.sh TRANSPORT [extra hub-loadgen args...]
#     TRANSPORT  ws | sse | mixed
#   Environment: CONNECTIONS (2000), RATE (1000), CHANNEL_RATE (5), CHANNEL_GROUPS (10),
#                RESUME (0.2), OFFLINE (2s), DURATION (20s), REDIS_PORT (6392),
#                PORT_A (9131), PORT_B (9132), BIN_DIR (target/release)
#
# Needs release builds (`cargo build --release -p hub -p loadtest`) and redis-server. Stops
# everything it started, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRANSPORT=${1:?usage: mixed.sh ws|sse|mixed}
shift
CONNECTIONS=${CONNECTIONS:-2000} RATE=${RATE:-1000} CHANNEL_RATE=${CHANNEL_RATE:-5}
CHANNEL_GROUPS=${CHANNEL_GROUPS:-10} RESUME=${RESUME:-0.2} OFFLINE=${OFFLINE:-2s} DURATION=${DURATION:-20s}
REDIS_PORT=${REDIS_PORT:-6392} PORT_A=${PORT_A:-9131} PORT_B=${PORT_B:-9132}
BIN=${BIN_DIR:-target/release}
# shellcheck source=loadtest/bench/two-nodes.sh
source loadtest/bench/two-nodes.sh

"$BIN/hub-loadgen" run --hub "http://127.0.0.1:$PORT_A" --hub "http://127.0.0.1:$PORT_B" \
  --publish-via "http://127.0.0.1:$PORT_B" \
  --scenario mixed --groups "$CHANNEL_GROUPS" --rate "$RATE" --channel-rate "$CHANNEL_RATE" \
  --resume-fraction "$RESUME" --offline "$OFFLINE" \
  --jwt-secret "$HUB_JWT_SECRET" --api-key "$HUB_API_KEY" --transport "$TRANSPORT" \
  --connections "$CONNECTIONS" --duration "$DURATION" --hold 3s --drain 10s \
  --source-port-base 28500 --server-pid "$a" --server-pid "$b" \
  --cpu-pid "node-a=$a" --cpu-pid "node-b=$b" --cpu-pid "redis=$redis" "$@"
