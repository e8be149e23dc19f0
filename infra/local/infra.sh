#!/usr/bin/env bash
# Starts / stops the local infrastructure (no Docker): `make infra-up` / `make infra-down`.
#
#   infra/local/infra.sh up   [--only LIST] [--record FILE]   start every service (each is a
#                                                           no-op when it runs)
#   infra/local/infra.sh down [--only LIST] [--record FILE]   stop every service this project's
#                                                           scripts started
#   infra/local/infra.sh status [--only LIST]               one line per service
#
# --only takes a comma-separated subset of SERVICES (e.g. `--only redis`); INFRA_ONLY in the
# environment does the same when --only is not given. `make test` starts only what the tests
# need (its `--only` list); `make infra-up` starts everything.
# With --record, `up` writes to FILE the services it actually started (not those already
# running), and `down` stops only the services listed in FILE, then removes FILE. `make test`
# uses this so it stops what it started and leaves running what `make infra-up` had started.
#
# Each service is a script infra/local/<name>.sh with start|stop|status that honours
# INFRA_RECORD (see redis.sh): redis.sh (127.0.0.1:LOCAL_REDIS_PORT, 6379), kafka.sh
# (127.0.0.1:LOCAL_KAFKA_PORT, 9092), kafka-cluster.sh (three brokers on 127.0.0.1:
# LOCAL_KAFKA_CLUSTER_PORT..+2, 9192-9194, replication 3; `kafka.sh cluster-brokers` prints
# them), redis-cluster.sh (3 masters + 3 replicas on 127.0.0.1:
# LOCAL_REDIS_CLUSTER_BASE+1..+6, 7001-7006) and postgres.sh (127.0.0.1:LOCAL_PG_PORT, 5432; role and
# password notify/notify; `postgres.sh url DB` prints a database's URL, `postgres.sh createdb
# DB` creates it). SERVICES is the start order; `down` stops in reverse order.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

SERVICES=(
  redis
  redis-cluster
  kafka
  kafka-cluster
  postgres
)

cmd=${1:-}
shift || true
record=""
only=${INFRA_ONLY:-}
while (($#)); do
  case $1 in
    --record) record=${2:?--record needs a file}; shift 2 ;;
    --only) only=${2:?--only needs a comma-separated list of services}; shift 2 ;;
    --only=*) only=${1#*=}; shift ;;
    *) echo "infra: unknown argument $1" >&2; exit 2 ;;
  esac
done

# Narrow SERVICES to --only (keeping the start order); an unknown name is an error.
if [[ -n $only ]]; then
  declare -A wanted=()
  IFS=', ' read -r -a names <<< "$only"
  for n in "${names[@]}"; do
    [[ -z $n ]] && continue
    found=0
    for s in "${SERVICES[@]}"; do [[ $s == "$n" ]] && found=1; done
    ((found)) || { echo "infra: unknown service '$n' in --only (known: ${SERVICES[*]})" >&2; exit 2; }
    wanted[$n]=1
  done
  selected=()
  for s in "${SERVICES[@]}"; do [[ -n ${wanted[$s]:-} ]] && selected+=("$s"); done
  ((${#selected[@]})) || { echo "infra: --only names no service" >&2; exit 2; }
  SERVICES=("${selected[@]}")
fi

up() {
  local rec=$record tmp=""
  if [[ -z $rec ]]; then tmp=$(mktemp); rec=$tmp; fi
  : > "$rec"
  for s in "${SERVICES[@]}"; do
    INFRA_RECORD=$rec "$HERE/$s.sh" start
  done
  local started
  started=$(paste -sd' ' "$rec")
  [[ -n $tmp ]] && rm -f "$tmp"
  echo "infra: up (${SERVICES[*]}); started now: ${started:-nothing, all were already running}"
}

down() {
  local stopped=() i s
  if [[ -n $record && ! -s $record ]]; then
    rm -f "$record"
    echo "infra: down; nothing to stop (this run started nothing)"
    return 0
  fi
  # Reverse start order; with --record only what that run started.
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    s=${SERVICES[i]}
    if [[ -n $record ]] && ! grep -qx "$s" "$record"; then continue; fi
    "$HERE/$s.sh" stop
    stopped+=("$s")
  done
  [[ -n $record ]] && rm -f "$record"
  echo "infra: down (${stopped[*]})"
}

status() {
  local rc=0
  for s in "${SERVICES[@]}"; do "$HERE/$s.sh" status || rc=$?; done
  return "$rc"
}

case $cmd in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down [--only LIST] [--record FILE] | status [--only LIST]" >&2; exit 2 ;;
esac
