#!/bin/bash
# kafka-run-class.sh CLASS [ARGS...]: a Kafka main class on /opt/kafka/libs, with the JVM
# settings the upstream script honours (KAFKA_HEAP_OPTS, KAFKA_JVM_PERFORMANCE_OPTS, KAFKA_OPTS,
# KAFKA_LOG4J_OPTS). The tools log warnings to stderr, the broker (kafka.Kafka) info to stdout.
set -euo pipefail
cls=${1:?usage: kafka-run-class.sh CLASS [ARGS...]}
shift
log4j=/opt/kafka/bin/tools-log4j2.properties
heap=${KAFKA_HEAP_OPTS:--Xmx256m}
perf=${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseSerialGC -XX:TieredStopAtLevel=1}
if [[ $cls == kafka.Kafka ]]; then
  log4j=/opt/kafka/bin/server-log4j2.properties
  heap=${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}
  perf=${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent}
fi
# shellcheck disable=SC2086 # the *_OPTS are lists of options
exec java $heap $perf -Djava.awt.headless=true ${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$log4j} \
  ${KAFKA_OPTS:-} -cp '/opt/kafka/libs/*' "$cls" "$@"
