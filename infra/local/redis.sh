#!/usr/bin/env bash
# Local Redis for tests and the demo, without Docker or systemd (Debian/Ubuntu).
#
#   infra/local/redis.sh start   install redis-server if missing, start our own instance on
#                                127.0.0.1:${LOCAL_REDIS_PORT:-6379} and wait until it answers PONG
#   infra/local/redis.sh stop    stop the instance this script started (nothing else)
#   infra/local/redis.sh status  one line; exit 0 when the port answers PONG, 3 when not
#   infra/local/redis.sh install install redis-server and redis-cli if missing (nothing starts)
#
# Our instance keeps its pid file, log and data dir under .run/redis/ (git-ignored), one set per
# port, and has no persistence (--save '' --appendonly no). If something else already answers
# PONG on the port, `start` reuses it and `stop` leaves it alone.
# When INFRA_RECORD names a file, `start` appends "redis" to it if it launched a new process,
# so a caller (infra.sh up --record, used by `make test`) can stop only what it started.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=infra/local/lib.sh
source "$ROOT/infra/local/lib.sh"
PORT=${LOCAL_REDIS_PORT:-6379}
HOST=127.0.0.1
DIR=$ROOT/.run/redis
PIDFILE=$DIR/redis-$PORT.pid
LOG=$DIR/redis-$PORT.log
DATA=$DIR/data-$PORT
WAIT_SECONDS=10 # bound for start and for stop

say() { echo "redis: $*"; }
die() { echo "redis: $*" >&2; exit 1; }

# The reply of `PING` on the port ("PONG" when a Redis answers), empty when nothing does.
ping_reply() {
  command -v redis-cli >/dev/null || return 0
  timeout 2 redis-cli -h "$HOST" -p "$PORT" ping 2>/dev/null || true
}

# The pid of the instance this script started on this port, when it still runs.
our_pid() {
  [[ -f $PIDFILE ]] || return 1
  local pid
  pid=$(tr -dc '0-9' < "$PIDFILE")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a reused pid: it must still be a redis-server.
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server* ]] || return 1
  echo "$pid"
}

install_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  command -v apt-get >/dev/null || die "redis-server is missing and apt-get is not available; install Redis and retry"
  local sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo=sudo; fi
  say "redis-server not found; installing the Debian package redis-server"
  # Keep the package's own service from starting (we run our own process): the standard
  # Debian policy-rc.d hook, only when none exists, removed again afterwards.
  local policy=/usr/sbin/policy-rc.d created=0 rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod 755 "$policy" && created=1
  fi
  $sudo apt-get update -qq || rc=$?
  if ((rc == 0)); then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server || rc=$?
  fi
  if ((created)); then $sudo rm -f "$policy"; fi
  ((rc == 0)) || die "apt-get failed (exit $rc) while installing redis-server"
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
    || die "redis-server or redis-cli still missing after installing redis-server"
}

start() {
  install_redis
  mkdir -p "$DIR" "$DATA"
  local pid reply
  if pid=$(our_pid); then
    # Ours runs: a no-op once it answers (it may still be loading right after a start).
    local deadline=$((SECONDS + WAIT_SECONDS))
    while ((SECONDS < deadline)); do
      [[ $(ping_reply) == PONG ]] && { say "already running (pid $pid) on $HOST:$PORT"; return 0; }
      sleep 0.1
    done
    die "our instance (pid $pid) does not answer PING on $HOST:$PORT; see $LOG"
  fi
  rm -f "$PIDFILE" # stale
  reply=$(ping_reply)
  if [[ $reply == PONG ]]; then
    say "$HOST:$PORT already answers PONG (a Redis this script did not start); reusing it"
    return 0
  elif [[ -n $reply ]]; then
    die "something on $HOST:$PORT answers PING with '$reply'; free the port or set LOCAL_REDIS_PORT"
  fi

  echo "--- $(date -Is) start on $HOST:$PORT" >> "$LOG"
  redis-server --bind "$HOST" --port "$PORT" --protected-mode yes \
    --daemonize yes --pidfile "$PIDFILE" --logfile "$LOG" --dir "$DATA" \
    --save '' --appendonly no >> "$LOG" 2>&1 \
    || { tail -n 20 "$LOG" >&2; die "redis-server failed to start; log: $LOG"; }
  local deadline=$((SECONDS + WAIT_SECONDS))
  while ((SECONDS < deadline)); do
    if [[ $(ping_reply) == PONG ]] && pid=$(our_pid); then
      say "started (pid $pid) on $HOST:$PORT; log $LOG"
      if [[ -n ${INFRA_RECORD:-} ]]; then echo redis >> "$INFRA_RECORD"; fi
      return 0
    fi
    sleep 0.1
  done
  echo "redis: not answering PONG on $HOST:$PORT after $WAIT_SECONDS s; last lines of $LOG:" >&2
  tail -n 20 "$LOG" >&2
  if pid=$(our_pid); then kill -TERM "$pid" 2>/dev/null || true; fi
  exit 1
}

stop() {
  local pid
  if ! pid=$(our_pid); then
    rm -f "$PIDFILE"
    if [[ $(ping_reply) == PONG ]]; then
      say "not started by this script on $HOST:$PORT; leaving the Redis there running"
    else
      say "not running on $HOST:$PORT; nothing to stop"
    fi
    return 0
  fi
  terminate "$pid" "$WAIT_SECONDS" || say "pid $pid still running after $WAIT_SECONDS s; killed it (SIGKILL)"
  rm -f "$PIDFILE"
  say "stopped (pid $pid) on $HOST:$PORT"
}

status() {
  local pid
  if pid=$(our_pid); then
    if [[ $(ping_reply) == PONG ]]; then
      say "running (pid $pid, started by this script) on $HOST:$PORT"
    else
      say "pid $pid (started by this script) does not answer PING on $HOST:$PORT; see $LOG"
      return 3
    fi
  elif [[ $(ping_reply) == PONG ]]; then
    say "$HOST:$PORT answers PONG (a Redis this script did not start)"
  else
    say "not running on $HOST:$PORT"
    return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  install) install_redis ;;
  *) echo "usage: $0 start|stop|status|install   (port: LOCAL_REDIS_PORT, default 6379)" >&2; exit 2 ;;
esac
