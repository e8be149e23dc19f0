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

dir=$(mktemp -d)
pids=()
topic=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ -n $topic ]]; then
    infra/local/kafka.sh run-class kafka.admin.TopicCommand --bootstrap-server "$KAFKA" \
      --delete --topic "$topic" >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
  --loglevel warning >/dev/null &
redis=$!; pids+=("$redis")
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done

export HUB_REDIS_URL=redis://127.0.0.1:$REDIS_PORT HUB_REDIS_PREFIX=bench HUB_LOG=warn
export HUB_JWT_SECRET=benchsecretbenchsecretbenchsecret01 HUB_API_KEY=benchkeybenchkey01
# One client address holds every connection here.
export HUB_MAX_CONNECTIONS_PER_IP=1000000
HUB_ADDR=127.0.0.1:$PORT_A $BIN/hub serve & a=$!; pids+=("$a")
kafka_args=()
if [[ $MODE == kafka ]]; then
  KAFKA=${KAFKA:-127.0.0.1:9092}
  topic="bench.load.$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
  infra/local/kafka.sh topics-create "$topic" 6 >/dev/null
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
  HUB_KAFKA_BROKERS=$KAFKA HUB_KAFKA_GROUP="bench-$topic" HUB_INGEST_ROUTES=$dir/routes.toml \
    HUB_INGEST_BUILTIN_ROUTES=false HUB_ADDR=127.0.0.1:$PORT_B $BIN/hub serve & b=$!
  kafka_args=(--kafka-brokers "$KAFKA" --kafka-topic "$topic")
  kafka_pid=$(pgrep -f 'kafka.Kafka' | head -1 || true)
  [[ -n $kafka_pid ]] && kafka_args+=(--cpu-pid "kafka=$kafka_pid")
else
  HUB_ADDR=127.0.0.1:$PORT_B HUB_GRPC_ADDR=127.0.0.1:$GRPC_B $BIN/hub serve & b=$!
fi
pids+=("$b")
for port in "$PORT_A" "$PORT_B"; do
  until curl -fs "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
done

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
