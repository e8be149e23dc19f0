#!/usr/bin/env bash
# The Kafka-ingest-on-Redis benchmark (docs/benchmarks.md): EVENTS JSON events for USERS users
# are produced to a fresh topic (PARTITIONS partitions) with kcat first; then one hub node
# with Kafka ingest on a private Redis consumes the backlog (no clients connected). Reports the
# wall time, server CPU per event split by process (the ingesting node, Redis), events per
# server CPU-second, and Redis memory and keys before and after (the dedupe memory follows the
# users, not the events).
#
#   loadtest/bench/ingest-redis.sh
#   Environment: EVENTS (1000000), USERS (10000), PARTITIONS (6), REDIS_PORT (6391),
#                PORT (9103), KAFKA (127.0.0.1:9092)
#
# Needs a release build of hub, redis-server, kcat and the local Kafka (make infra-up).
set -euo pipefail
cd "$(dirname "$0")/../.."
EVENTS=${EVENTS:-1000000} USERS=${USERS:-10000} PARTITIONS=${PARTITIONS:-6}
REDIS_PORT=${REDIS_PORT:-6391} PORT=${PORT:-9103} KAFKA=${KAFKA:-127.0.0.1:9092}
BIN=target/release
[[ -x $BIN/hub ]] || { echo "build first: cargo build --release -p hub" >&2; exit 1; }

# shellcheck source=loadtest/bench/scratch.sh
source loadtest/bench/scratch.sh

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }   # clock ticks (USER_HZ = 100)
mem() { redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }

private_redis "$REDIS_PORT"
throwaway_topic bench.ingest "$PARTITIONS"
echo "producing $EVENTS events for $USERS users to $topic ..."
awk -v n="$EVENTS" -v u="$USERS" 'BEGIN { for (i = 0; i < n; i++) {
  printf "u%d:{\"event_id\":\"e%d\",\"user_id\":\"u%d\",\"n\":%d}\n", i % u, i, i % u, i } }' \
  > "$dir/events"
kcat -P -b "$KAFKA" -t "$topic" -K: -H content-type=application/json -X linger.ms=20 \
  -X batch.num.messages=10000 -l "$dir/events"

cat > "$dir/routes.toml" <<TOML
[[route]]
name = "bench"
topic = "$topic"
message = "json"
type = "load"
recipients = ["user_id"]
data = { n = "n" }
TOML
mem_before=$(mem)
export HUB_ADDR=127.0.0.1:$PORT HUB_LOG=warn HUB_JWT_SECRET=benchsecretbenchsecretbenchsecret01
export HUB_REDIS_URL=redis://127.0.0.1:$REDIS_PORT HUB_REDIS_PREFIX=bench
export HUB_KAFKA_BROKERS=$KAFKA HUB_KAFKA_GROUP="bench-$topic" HUB_INGEST_ROUTES=$dir/routes.toml
export HUB_INGEST_BUILTIN_ROUTES=false
redis_cpu0=$(cpu "$redis")
start=$(date +%s.%N)
$BIN/hub serve & hub=$!; pids+=("$hub")
series="hub_ingest_events_total{outcome=\"published\",topic=\"$topic\"}"
done_events=0
deadline=$(( $(date +%s) + 600 ))
while (( done_events < EVENTS )); do
  sleep 0.2
  (( $(date +%s) < deadline )) || { echo "ingest did not finish within 10 minutes ($done_events)" >&2; exit 1; }
  done_events=$(curl -fs "http://127.0.0.1:$PORT/metrics" 2>/dev/null \
    | awk -v s="$series" 'index($0, s) == 1 {print int($2)}')
  done_events=${done_events:-0}
done
end=$(date +%s.%N)
hub_cpu=$(cpu "$hub"); redis_cpu=$(( $(cpu "$redis") - redis_cpu0 ))
mem_after=$(mem)
keys=$(redis-cli -p "$REDIS_PORT" dbsize)
# What one user's keys hold: history stream, dedupe window, meta.
for kind in h e m; do
  printf 'one user      %s %s bytes\n' "$kind" \
    "$(redis-cli -p "$REDIS_PORT" memory usage "bench:$kind:{u1}" | tr -d '\r')"
done
awk -v e="$EVENTS" -v u="$USERS" -v s="$start" -v t="$end" -v h="$hub_cpu" -v r="$redis_cpu" \
    -v m0="$mem_before" -v m1="$mem_after" -v k="$keys" 'BEGIN {
  wall = t - s; hs = h / 100; rs = r / 100
  printf "ingested      %d events for %d users in %.1f s (%.0f events/s, node start included)\n", e, u, wall, e / wall
  printf "cpu per event node %.1f s = %.1f us, redis %.1f s = %.1f us, total %.1f us\n", hs, hs * 1e6 / e, rs, rs * 1e6 / e, (hs + rs) * 1e6 / e
  printf "events per server cpu-second  %.0f\n", e / (hs + rs)
  printf "redis memory  %.1f MiB -> %.1f MiB (+%.1f MiB), %d keys (%.1f per user)\n", m0 / 1048576, m1 / 1048576, (m1 - m0) / 1048576, k, k / u
}'
