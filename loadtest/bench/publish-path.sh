#!/usr/bin/env bash
# The publish-path benchmark (docs/benchmarks.md): a private Redis, two hub nodes on it,
# CONNECTIONS client connections of as many users on node A, RATE notifications/s published
# through node B, server CPU per delivery split by process (node A, node B, Redis).
#
#   loadtest/bench/publish-path.sh MODE TRANSPORT [extra hub-loadgen args...]
#     MODE       http | batch | grpc | kafka
#                                    (single POST /api/publish, /api/publish/batch of BATCH,
#                                     gRPC PublishStream to node B's HUB_GRPC_ADDR, or JSON
#                                     events produced to a fresh Kafka topic that node B
#                                     ingests: the Kafka-ingest-on-Redis path end to end)
#     TRANSPORT  ws | sse | mixed
#   Environment: CONNECTIONS (10000), RATE (5000), DURATION (20s), BATCH (100),
#                REDIS_PORT (6390), PORT_A (9101), PORT_B (9102), BIN_DIR (target/release:
#                where hub and hub-loadgen are, e.g. a previous build to compare with)
#
# Needs release builds (`cargo build --release -p hub -p loadtest`) and redis-server. Stops
# everything it started, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:?usage: publish-path.sh http|batch ws|sse|mixed}
TRANSPORT=${2:?usage: publish-path.sh http|batch ws|sse|mixed}
shift 2
CONNECTIONS=${CONNECTIONS:-10000} RATE=${RATE:-5000} DURATION=${DURATION:-20s} BATCH=${BATCH:-100}
REDIS_PORT=${REDIS_PORT:-6390} PORT_A=${PORT_A:-9101} PORT_B=${PORT_B:-9102} GRPC_B=${GRPC_B:-9202}
BIN=${BIN_DIR:-target/release}
[[ -x $BIN/hub && -x $BIN/hub-loadgen ]] || { echo "build first: cargo build --release -p hub -p loadtest" >&2; exit 1; }

# shellcheck source=loadtest/bench/scratch.sh
source loadtest/bench/scratch.sh
kafka_args=()
if [[ $MODE == kafka ]]; then
  KAFKA=${KAFKA:-127.0.0.1:9092}
  throwaway_topic bench.load 6
  cat > "$dir/routes.toml" <<TOML
[[route]]
name = "load"
topic = "$topic"
message = "json"
type = "load"
recipients = ["user_id"]
event_id = "event_id"
data = { sent_us = "sent_us", seq = "seq" }
TOML
  NODE_B_ENV="HUB_KAFKA_BROKERS=$KAFKA HUB_KAFKA_GROUP=bench-$topic HUB_INGEST_ROUTES=$dir/routes.toml HUB_INGEST_BUILTIN_ROUTES=false"
  kafka_args=(--kafka-brokers "$KAFKA" --kafka-topic "$topic")
  kafka_pid=$(pgrep -f 'kafka.Kafka' | head -1 || true)
  [[ -n $kafka_pid ]] && kafka_args+=(--cpu-pid "kafka=$kafka_pid")
else
  NODE_B_ENV="HUB_GRPC_ADDR=127.0.0.1:$GRPC_B"
fi
# shellcheck source=loadtest/bench/two-nodes.sh
source loadtest/bench/two-nodes.sh

args=()
[[ $MODE != kafka ]] && args+=(--publish-mode "$MODE")
[[ $MODE == batch ]] && args+=(--batch-size "$BATCH")
via=(--publish-via "http://127.0.0.1:$PORT_B")
[[ $MODE == grpc ]] && via=(--publish-via "http://127.0.0.1:$GRPC_B")
[[ $MODE == kafka ]] && via=()
$BIN/hub-loadgen run --hub "http://127.0.0.1:$PORT_A" "${via[@]}" \
  --jwt-secret "$HUB_JWT_SECRET" --api-key "$HUB_API_KEY" --transport "$TRANSPORT" \
  --connections "$CONNECTIONS" --rate "$RATE" --duration "$DURATION" --hold 3s --drain 5s \
  --source-port-base 12000 --server-pid "$a" \
  --cpu-pid "node-a=$a" --cpu-pid "node-b=$b" --cpu-pid "redis=$redis" "${args[@]}" \
  "${kafka_args[@]}" "$@"
# Where Redis spent its time, per command (REDIS_STATS=1).
if [[ ${REDIS_STATS:-} == 1 ]]; then
  redis-cli -p "$REDIS_PORT" info commandstats | grep -E 'calls=' | sort -t= -k3 -rn | head -12
fi
