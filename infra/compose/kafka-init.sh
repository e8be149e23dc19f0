#!/bin/bash
# compose.yaml's one-shot `kafka-init` (in the Kafka image): waits until the broker at
# $BOOTSTRAP serves metadata (at most KAFKA_INIT_TIMEOUT seconds, default 120: an engine that
# does not enforce `service_healthy` may start this early), then creates each of $TOPICS and
# its .dlq with $PARTITIONS partitions (replication 1) unless it exists. Exit 0 when all exist.
set -euo pipefail
bin=/opt/kafka/bin
deadline=$((SECONDS + ${KAFKA_INIT_TIMEOUT:-120}))
until "$bin/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --list > /dev/null 2>&1; do
  if ((SECONDS >= deadline)); then
    echo "kafka-init: $BOOTSTRAP does not list topics after ${KAFKA_INIT_TIMEOUT:-120} s" >&2
    exit 1
  fi
  sleep 2
done
# One JVM per topic: run them a few at a time.
pids=()
for t in $TOPICS; do
  for name in "$t" "$t.dlq"; do
    "$bin/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
      --topic "$name" --partitions "$PARTITIONS" --replication-factor 1 > /dev/null &
    pids+=($!)
  done
  if ((${#pids[@]} >= 4)); then
    for p in "${pids[@]}"; do wait "$p"; done
    pids=()
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
have=$("$bin/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --list)
for t in $TOPICS; do
  for name in "$t" "$t.dlq"; do
    grep -qx -- "$name" <<< "$have" || { echo "kafka-init: topic $name missing after creating it" >&2; exit 1; }
  done
done
echo "kafka-init: topics ready on $BOOTSTRAP: $(tr '\n' ' ' <<< "$have")"
