# shellcheck shell=bash
# Sourced by the benchmarks: a scratch directory (`dir`) and the processes a benchmark starts
# (`pids`), all stopped and the directory removed on exit, also on failure, after the
# functions named in `on_exit` ran (e.g. deleting a Kafka topic).
dir=$(mktemp -d)
pids=()
on_exit=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for f in "${on_exit[@]}"; do "$f" || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

# private_redis PORT: a redis-server of this benchmark's own (no persistence) on PORT, ready;
# sets `redis` (its process id).
private_redis() {
  redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --loglevel warning >/dev/null &
  redis=$!; pids+=("$redis")
  until redis-cli -p "$1" ping >/dev/null 2>&1; do sleep 0.1; done
}

# throwaway_topic NAME PARTITIONS: creates a fresh Kafka topic `NAME.<random>` on KAFKA,
# deleted on exit; sets `topic`.
throwaway_topic() {
  topic="$1.$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
  on_exit+=(delete_topic)
  infra/local/kafka.sh topics-create "$topic" "$2" >/dev/null
}
delete_topic() {
  infra/local/kafka.sh run-class kafka.admin.TopicCommand --bootstrap-server "$KAFKA" \
    --delete --topic "$topic" >/dev/null 2>&1
}
