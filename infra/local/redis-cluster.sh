#!/usr/bin/env bash
# A local Redis Cluster for tests and benchmarks: 3 masters and 3 replicas from Debian's
# redis-server, without Docker or systemd.
#
#   infra/local/redis-cluster.sh start    install redis-server if missing, start six nodes on
#                                         127.0.0.1:BASE+1 .. BASE+6 (BASE is
#                                         LOCAL_REDIS_CLUSTER_BASE, 7000), join them into one
#                                         cluster (one replica per master) and wait until every
#                                         node reports cluster_state:ok
#   infra/local/redis-cluster.sh stop     stop the nodes this script started (nothing else)
#   infra/local/redis-cluster.sh status   one line; exit 0 when the cluster is ok, 3 when not
#   infra/local/redis-cluster.sh urls     the node URLs, comma-separated (for
#                                         HUB_REDIS_CLUSTER_URLS)
#
# Each node keeps its pid file, log, data and cluster config under .run/redis-cluster/ (git-
# ignored), without persistence. A node left from an earlier run is reused when the cluster
# it belongs to is healthy; a broken half-started set is stopped and created afresh. With
# INFRA_RECORD naming a file, `start` appends "redis-cluster" to it when it launched nodes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=infra/local/lib.sh
source "$ROOT/infra/local/lib.sh"
BASE=${LOCAL_REDIS_CLUSTER_BASE:-7000}
HOST=127.0.0.1
DIR=$ROOT/.run/redis-cluster
NODES=6
WAIT_SECONDS=20

say() { echo "redis-cluster: $*"; }
die() { echo "redis-cluster: $*" >&2; exit 1; }

ports() { local i; for ((i = 1; i <= NODES; i++)); do echo $((BASE + i)); done; }

# The pid of our node on PORT, when it still runs and is a redis-server.
node_pid() {
  local pidfile=$DIR/node-$1.pid pid
  [[ -f $pidfile ]] || return 1
  pid=$(tr -dc '0-9' < "$pidfile")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]] || return 1
  echo "$pid"
}

cli() { timeout 5 redis-cli -h "$HOST" -p "$1" "${@:2}" 2>/dev/null; }

# Whether every node answers and reports cluster_state:ok.
healthy() {
  local p
  for p in $(ports); do
    cli "$p" cluster info | grep -q '^cluster_state:ok' || return 1
  done
}

install_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  # redis.sh knows how to install the Debian package without starting its service.
  LOCAL_REDIS_PORT=0 "$ROOT/infra/local/redis.sh" install
}

start_node() {
  local port=$1 data=$DIR/data-$1
  mkdir -p "$data"
  if cli "$port" ping | grep -q PONG && ! node_pid "$port" >/dev/null; then
    die "something else answers on $HOST:$port; free the ports $((BASE + 1))-$((BASE + NODES)) or set LOCAL_REDIS_CLUSTER_BASE"
  fi
  node_pid "$port" >/dev/null && return 0
  redis-server --bind "$HOST" --port "$port" --protected-mode yes --daemonize yes \
    --pidfile "$DIR/node-$port.pid" --logfile "$DIR/node-$port.log" --dir "$data" \
    --cluster-enabled yes --cluster-config-file "$data/nodes.conf" \
    --cluster-node-timeout 2000 --save '' --appendonly no \
    || die "redis-server failed to start on $port; log: $DIR/node-$port.log"
  local deadline=$((SECONDS + WAIT_SECONDS))
  until cli "$port" ping | grep -q PONG; do
    ((SECONDS < deadline)) || die "node $port does not answer; log: $DIR/node-$port.log"
    sleep 0.1
  done
}

stop_nodes() {
  local p pid
  for p in $(ports); do
    if pid=$(node_pid "$p"); then
      kill -TERM "$pid" 2>/dev/null || true
      local deadline=$((SECONDS + 10))
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    fi
    rm -f "$DIR/node-$p.pid"
  done
}

start() {
  install_redis
  mkdir -p "$DIR"
  if healthy; then
    say "already running and ok on $HOST:$((BASE + 1))-$((BASE + NODES))"
    return 0
  fi
  # Anything left of an earlier set is not a cluster we can trust: start clean.
  stop_nodes
  rm -rf "$DIR"/data-*
  local p addrs=()
  for p in $(ports); do
    start_node "$p"
    addrs+=("$HOST:$p")
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
    > "$DIR/create.log" 2>&1 || { tail -n 20 "$DIR/create.log" >&2; stop_nodes; die "cluster create failed"; }
  local deadline=$((SECONDS + WAIT_SECONDS))
  until healthy; do
    if ((SECONDS >= deadline)); then stop_nodes; die "cluster not ok after $WAIT_SECONDS s; see $DIR"; fi
    sleep 0.2
  done
  say "started 3 masters + 3 replicas on $HOST:$((BASE + 1))-$((BASE + NODES)); logs in $DIR"
  if [[ -n ${INFRA_RECORD:-} ]]; then echo redis-cluster >> "$INFRA_RECORD"; fi
}

stop() {
  stop_nodes
  say "stopped the nodes this script started"
}

status() {
  if healthy; then
    say "ok on $HOST:$((BASE + 1))-$((BASE + NODES))"
  else
    say "not running or not ok on $HOST:$((BASE + 1))-$((BASE + NODES))"
    exit 3
  fi
}

urls() {
  local p out=()
  for p in $(ports); do out+=("redis://$HOST:$p"); done
  (IFS=,; echo "${out[*]}")
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  urls) urls ;;
  *) echo "usage: $0 start|stop|status|urls" >&2; exit 2 ;;
esac
