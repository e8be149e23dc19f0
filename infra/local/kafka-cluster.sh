#!/usr/bin/env bash
# The three-broker Kafka cluster of infra/local/kafka.sh as an infra.sh service:
#
#   infra/local/kafka-cluster.sh start|stop|status|brokers|kill N
#
# is `infra/local/kafka.sh cluster-start|cluster-stop|...` (see there: 127.0.0.1:9192-9194,
# replication 3, min.insync.replicas 2, under .run/kafka-cluster/).
set -euo pipefail
case ${1:-} in
  start | stop | status | brokers | kill) ;;
  *) echo "usage: $0 start|stop|status|brokers|kill N" >&2; exit 2 ;;
esac
cmd=$1
shift
exec "$(dirname "$0")/kafka.sh" "cluster-$cmd" "$@"
