#!/usr/bin/env bash
# Starts / stops the local demo: two hub nodes in dev mode sharing the local Redis
# (node A 127.0.0.1:8080, which also serves the page, and node B 127.0.0.1:8082), in the
# background. Credentials are written to .run/demo.env (git-ignored) so scripts can mint
# tokens (`hub token`) and publish. `make demo` starts Redis first (infra/local/infra.sh up).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=.run
mkdir -p "$RUN"
HUB=target/release/hub

NODES=("a:8080" "b:8082")

start_node() {
  local name=$1 port=$2
  if [[ -f $RUN/hub-$name.pid ]] && kill -0 "$(cat "$RUN/hub-$name.pid")" 2>/dev/null; then
    echo "demo: node $name already running (pid $(cat "$RUN/hub-$name.pid"))"
    return
  fi
  # Node A also runs Kafka ingest (the built-in routes), so events produced to
  # order.status.changed and moderation.results reach the users on either node.
  local kafka=()
  [[ $name == a ]] && kafka=(HUB_KAFKA_BROKERS=127.0.0.1:${LOCAL_KAFKA_PORT:-9092})
  env "${kafka[@]}" HUB_ADDR=127.0.0.1:$port HUB_REDIS_URL=redis://127.0.0.1:${LOCAL_REDIS_PORT:-6379} \
    HUB_LOG=info nohup "$HUB" serve --dev > "$RUN/hub-$name.log" 2>&1 &
  echo $! > "$RUN/hub-$name.pid"
}

wait_ready() {
  local name=$1 port=$2
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$(cat "$RUN/hub-$name.pid")" 2>/dev/null; then
      echo "demo: node $name exited; see $RUN/hub-$name.log:" >&2
      tail -5 "$RUN/hub-$name.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "demo: node $name not ready on port $port; see $RUN/hub-$name.log" >&2
  exit 1
}

start() {
  if [[ ! -f $RUN/demo.env ]]; then
    {
      echo "HUB_JWT_SECRET=$(openssl rand -hex 32)"
      echo "HUB_API_KEY=$(openssl rand -hex 24)"
    } > "$RUN/demo.env"
  fi
  set -a; source "$RUN/demo.env"; set +a
  for topic in order.status.changed moderation.results; do
    infra/local/kafka.sh topics-create "$topic" 3 >/dev/null
    infra/local/kafka.sh topics-create "$topic.dlq" 3 >/dev/null
  done
  for node in "${NODES[@]}"; do start_node "${node%%:*}" "${node##*:}"; done
  for node in "${NODES[@]}"; do wait_ready "${node%%:*}" "${node##*:}"; done
  token=$("$HUB" token --sub alice --ttl 1h)
  cat <<MSG

  The hub is running: two nodes on Redis (dev mode).   Open:   http://127.0.0.1:8080/

  A token for user "alice":  $token

  Listen on node B:  curl -N "http://127.0.0.1:8082/sse?token=$token"
  Publish on node A: curl -H "Authorization: Bearer \$HUB_API_KEY" \\
                       -d '{"user_id":"alice","type":"promo","data":{"text":"hello"}}' \\
                       http://127.0.0.1:8080/api/publish
                     (HUB_API_KEY and HUB_JWT_SECRET are in .run/demo.env)
  Or through Kafka:  echo 'o-1:{"eventId":"e-1","orderId":"o-1","userId":"alice","status":"ORDER_STATUS_PAID","previousStatus":"ORDER_STATUS_CREATED"}' |
                       kcat -P -b 127.0.0.1:9092 -t order.status.changed -H content-type=application/json -K:
  Stop:              make stop

MSG
}

stop() {
  local any=0
  for node in "${NODES[@]}"; do
    local name=${node%%:*}
    [[ -f $RUN/hub-$name.pid ]] || continue
    any=1
    pid=$(cat "$RUN/hub-$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
    fi
    rm -f "$RUN/hub-$name.pid"
  done
  if ((any)); then echo "demo: hub nodes stopped"; else echo "demo: no hub node running"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
