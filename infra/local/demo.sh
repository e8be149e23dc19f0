#!/usr/bin/env bash
# Starts / stops the local demo in the background (`make demo` / `make stop`):
#   hub node A   127.0.0.1:8080  dev mode, Kafka ingest, serves the page at /
#   hub node B   127.0.0.1:8082  dev mode
#   order        127.0.0.1:8081  REST orders; consumes payment.completed, delivery.status.updated
#   moderation   127.0.0.1:8083  REST reports; moderation worker
#   payment      127.0.0.1:8084  (health and metrics only)
#   delivery     127.0.0.1:8085  (health and metrics only)
#   prometheus   127.0.0.1:9090  Debian's, with infra/prometheus/prometheus.yml and the repo's
#                                rules (data in .run/prometheus/, kept across restarts)
# on the local Redis, Kafka and PostgreSQL that `make demo` starts first (infra/local/infra.sh).
# Each service gets its own database (created and migrated at start). The hub's signing secret
# and API key are written to .run/demo.env (git-ignored); the services verify tokens signed with
# the same secret, but each takes only its own audience: the hub's tokens carry aud "hub"
# (HUB_JWT_AUDIENCE, also in demo.env), the order service wants "orders", the moderation
# service "moderation" (the page gets one token of each from the dev login). The moderation
# service's catalogue is seeded with the demo's ads (ad-1..ad-5 of alice, bob and broke;
# MODERATION_DEMO_ADS).
# DEMO_STEP_INTERVAL (default 2s) sets the delivery service's pace between delivery steps.
# DEMO_KAFKA_SASL=1 connects the services and the ingesting hub node through the local broker's
# SASL_PLAINTEXT listener (127.0.0.1:9094, users services / hub; see infra/local/kafka.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=infra/local/lib.sh
source infra/local/lib.sh
RUN=.run
mkdir -p "$RUN"
BIN=target/release
PG=infra/local/postgres.sh
KAFKA=127.0.0.1:${LOCAL_KAFKA_PORT:-9092}
KAFKA_SASL=127.0.0.1:${LOCAL_KAFKA_SASL_PORT:-$((${LOCAL_KAFKA_PORT:-9092} + 2))}
REDIS=redis://127.0.0.1:${LOCAL_REDIS_PORT:-6379}
ORIGINS=http://127.0.0.1:8080,http://localhost:8080

# name:port, in start order (stopped in reverse).
PROCS=("hub-a:8080" "hub-b:8082" "order:8081" "payment:8084" "delivery:8085" "moderation:8083" "prometheus:9090")

# Topics and their partition counts (every one also gets a .dlq with the same count).
TOPICS=(order.created payment.completed delivery.status.updated order.status.changed moderation.tasks moderation.results)
PARTITIONS=3

# Kafka settings of a service (prefix $1) and of the ingesting hub node: the PLAINTEXT listener,
# or with DEMO_KAFKA_SASL=1 the SASL_PLAINTEXT one with the local test users.
kafka_env() {
  local prefix=$1 user=$2
  if [[ ${DEMO_KAFKA_SASL:-0} == 1 ]]; then
    echo "${prefix}KAFKA_BROKERS=$KAFKA_SASL ${prefix}KAFKA_SECURITY_PROTOCOL=sasl_plaintext" \
      "${prefix}KAFKA_SASL_MECHANISM=PLAIN ${prefix}KAFKA_SASL_USERNAME=$user ${prefix}KAFKA_SASL_PASSWORD=$user-secret"
  else
    echo "${prefix}KAFKA_BROKERS=$KAFKA"
  fi
}

running() { [[ -f $RUN/$1.pid ]] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }

launch() {
  local name=$1; shift
  if running "$name"; then
    echo "demo: $name already running (pid $(cat "$RUN/$name.pid"))"
    return
  fi
  env "$@" > "$RUN/$name.log" 2>&1 &
  echo $! > "$RUN/$name.pid"
}

start_proc() {
  local name=$1 port=$2
  # shellcheck disable=SC2046 # kafka_env prints NAME=value words without spaces, to be split
  case $name in
    hub-a) launch "$name" $(kafka_env HUB_ hub) HUB_ADDR=127.0.0.1:$port HUB_REDIS_URL="$REDIS" \
             HUB_JWT_AUDIENCE=hub HUB_LOG=info nohup "$BIN/hub" serve --dev ;;
    hub-b) launch "$name" HUB_ADDR=127.0.0.1:$port HUB_REDIS_URL="$REDIS" HUB_JWT_AUDIENCE=hub HUB_LOG=info \
             nohup "$BIN/hub" serve --dev ;;
    order) launch "$name" ORDER_ADDR=127.0.0.1:$port ORDER_DATABASE_URL="$($PG url orders)" \
             $(kafka_env ORDER_ services) ORDER_JWT_SECRET="$HUB_JWT_SECRET" ORDER_HUB_AUDIENCE=hub ORDER_ALLOWED_ORIGINS="$ORIGINS" \
             nohup "$BIN/order-service" ;;
    payment) launch "$name" PAYMENT_ADDR=127.0.0.1:$port PAYMENT_DATABASE_URL="$($PG url payments)" \
               $(kafka_env PAYMENT_ services) nohup "$BIN/payment-service" ;;
    delivery) launch "$name" DELIVERY_ADDR=127.0.0.1:$port DELIVERY_DATABASE_URL="$($PG url deliveries)" \
                $(kafka_env DELIVERY_ services) DELIVERY_STEP_INTERVAL="${DEMO_STEP_INTERVAL:-2s}" \
                nohup "$BIN/delivery-service" ;;
    moderation) launch "$name" MODERATION_ADDR=127.0.0.1:$port MODERATION_DATABASE_URL="$($PG url moderation)" \
                  $(kafka_env MODERATION_ services) MODERATION_JWT_SECRET="$HUB_JWT_SECRET" \
                  MODERATION_ALLOWED_ORIGINS="$ORIGINS" MODERATION_DEMO_ADS=true nohup "$BIN/moderation-service" ;;
    prometheus) launch "$name" nohup /usr/bin/prometheus --config.file=infra/prometheus/prometheus.yml \
                  --storage.tsdb.path="$RUN/prometheus" --storage.tsdb.retention.time=2d \
                  --web.listen-address=127.0.0.1:$port ;;
  esac
}

wait_ready() {
  local name=$1 port=$2 path=/readyz
  [[ $name == prometheus ]] && path=/-/ready
  for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$port$path" >/dev/null 2>&1; then return 0; fi
    if ! running "$name"; then
      echo "demo: $name exited; see $RUN/$name.log:" >&2
      tail -5 "$RUN/$name.log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "demo: $name not ready on port $port within 30 s; see $RUN/$name.log" >&2
  exit 1
}

start() {
  for b in hub order-service payment-service delivery-service moderation-service; do
    [[ -x $BIN/$b ]] || { echo "demo: $BIN/$b missing; run make build-release (make demo does)" >&2; exit 1; }
  done
  infra/local/ops-deps.sh prometheus >/dev/null
  if [[ ! -f $RUN/demo.env ]]; then
    {
      echo "HUB_JWT_SECRET=$(openssl rand -hex 32)"
      echo "HUB_API_KEY=$(openssl rand -hex 24)"
      echo "HUB_JWT_AUDIENCE=hub"
    } > "$RUN/demo.env"
  fi
  # The hub nodes' audience, so `hub token` run with demo.env mints tokens the nodes accept
  # (added to a demo.env written before audiences existed).
  grep -q '^HUB_JWT_AUDIENCE=' "$RUN/demo.env" || echo "HUB_JWT_AUDIENCE=hub" >> "$RUN/demo.env"
  set -a; source "$RUN/demo.env"; set +a
  for db in orders payments deliveries moderation; do "$PG" createdb "$db" >/dev/null; done
  for topic in "${TOPICS[@]}"; do
    infra/local/kafka.sh topics-create "$topic" "$PARTITIONS" >/dev/null
    infra/local/kafka.sh topics-create "$topic.dlq" "$PARTITIONS" >/dev/null
  done
  for p in "${PROCS[@]}"; do start_proc "${p%%:*}" "${p##*:}"; done
  for p in "${PROCS[@]}"; do wait_ready "${p%%:*}" "${p##*:}"; done
  # Each token names its audience (the hub's, "hub", is also the default from demo.env).
  token=$("$BIN/hub" token --sub alice --ttl 1h --aud hub)
  order_token=$("$BIN/hub" token --sub alice --ttl 1h --aud orders)
  report_token=$("$BIN/hub" token --sub bob --ttl 1h --aud moderation)
  cat <<MSG

  The demo is running: two hub nodes on Redis, the order, payment, delivery and moderation
  services on PostgreSQL and Kafka (${#TOPICS[@]} topics × $PARTITIONS partitions, each with a .dlq),
  and Prometheus scraping them all.

  Open:  http://127.0.0.1:8080/
         Sign in (alice, or "broke" who cannot pay), place an order, watch it travel.

  Tokens are per audience: "hub" for /ws and /sse, "orders" and "moderation" for the services
  (hub token --sub USER --aud AUDIENCE mints them; the page gets them from the dev login).
  alice, for the hub:             $token
  alice, for the order service:   $order_token
  bob, for the moderation service: $report_token

  Listen on node B:  curl -N "http://127.0.0.1:8082/sse?token=$token"
  Place an order:    curl -H "Authorization: Bearer $order_token" -H 'content-type: application/json' \\
                       -d '{"items":[{"product_id":"p1","quantity":2,"price_cents":14999}],"delivery_address":"1 Main St"}' \\
                       http://127.0.0.1:8081/orders
  Report alice's ad: curl -H "Authorization: Bearer $report_token" -H 'content-type: application/json' \\
                       -d '{"target_type":"ad","target_id":"ad-1","reason":"looks like a scam"}' \\
                       http://127.0.0.1:8083/reports
                     (the catalogue: curl http://127.0.0.1:8083/ads; alice owns ad-1 and ad-3,
                     bob ad-2 and ad-4, broke ad-5)
  Publish on node A: curl -H "Authorization: Bearer \$HUB_API_KEY" \\
                       -d '{"user_id":"alice","type":"promo","data":{"text":"hello"}}' \\
                       http://127.0.0.1:8080/api/publish
                     (HUB_API_KEY and HUB_JWT_SECRET are in .run/demo.env)
  Prometheus:        http://127.0.0.1:9090/  (alerts: /alerts; rules and alerts in infra/prometheus/)
  Logs:              .run/<name>.log (hub-a, hub-b, order, payment, delivery, moderation, prometheus)
  Stop:              make stop

MSG
}

stop() {
  local any=0 i name pid
  for ((i = ${#PROCS[@]} - 1; i >= 0; i--)); do
    name=${PROCS[i]%%:*}
    [[ -f $RUN/$name.pid ]] || continue
    any=1
    pid=$(cat "$RUN/$name.pid")
    terminate "$pid" 15 || echo "demo: $name still running after 15 s; killed it (SIGKILL)"
    rm -f "$RUN/$name.pid"
  done
  if ((any)); then echo "demo: hub nodes and services stopped"; else echo "demo: nothing running"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
