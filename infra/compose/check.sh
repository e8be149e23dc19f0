#!/usr/bin/env bash
# The compose check (`make compose-check`, part of `make test`): runs infra/compose/compose.yaml
# with podman-compose under a project name of its own, waits until every service is healthy,
# places an order through the order service and checks that a listener on hub node B (over SSE)
# receives the order's statuses CREATED, PAID, IN_TRANSIT, OUT_FOR_DELIVERY, DELIVERED, each
# once and in that order; then takes the project down (containers, network, volumes), also on
# failure.
#
# Installs when missing: podman and runc, the CNI dnsname plugin (service names on the
# project's network), and podman-compose from PyPI (PODMAN_COMPOSE_VERSION) into
# .run/compose/venv. Builds when missing: the stand-ins for the upstream Redis, Kafka,
# PostgreSQL and Prometheus images (infra/docker/standins/build.sh: no registry is needed) and
# notification-hub/hub and notification-hub/services from the current debug binaries under the
# tag `compose-check` (infra/docker/images.sh --prebuilt <target>/debug --strip), removed after.
# Secrets are random for each run; every port is published on 127.0.0.1 only, on free ports.
# Deadline: COMPOSE_CHECK_TIMEOUT seconds (default 240) for the stack to become healthy, then
# 120 s for the order. About two minutes once the images exist.
#
# Without systemd, podman runs no periodic health checks, and podman older than 4.6 cannot wait
# for `service_healthy`: this script runs each service's health check itself (`podman
# healthcheck run`) and starts each service once its depends_on conditions hold (below).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

PODMAN_COMPOSE_VERSION=${PODMAN_COMPOSE_VERSION:-1.6.0}
TIMEOUT=${COMPOSE_CHECK_TIMEOUT:-240}
FILE=infra/compose/compose.yaml
PROJECT=nh-compose-check-$$
VENV=$ROOT/.run/compose/venv

say() { echo "compose check: $*"; }
die() { echo "compose check: $*" >&2; exit 1; }
T0=$SECONDS

# --- what it needs -------------------------------------------------------------------------

sudo=""
[[ $(id -u) -ne 0 ]] && sudo=sudo
apt_install() {
  say "installing the Debian package(s): $*"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" > /dev/null
}
if ! command -v podman > /dev/null || ! command -v runc > /dev/null; then apt_install podman runc; fi
if [[ -z ${CONTAINERS_CONF:-} && ! -d /run/systemd/system ]]; then
  export CONTAINERS_CONF=$ROOT/infra/docker/containers.conf
fi
# Name resolution between containers: netavark's aardvark-dns, or with CNI the dnsname plugin.
if [[ $(podman info --format '{{.Host.NetworkBackend}}') == cni ]] \
    && [[ ! -x /usr/lib/cni/dnsname && ! -x /usr/libexec/cni/dnsname ]]; then
  apt_install golang-github-containernetworking-plugin-dnsname
fi
if [[ ! -x $VENV/bin/podman-compose ]] \
    || [[ $("$VENV/bin/podman-compose" --version 2>/dev/null | sed -n 's/^podman-compose version //p') != "$PODMAN_COMPOSE_VERSION" ]]; then
  say "installing podman-compose $PODMAN_COMPOSE_VERSION from PyPI into $VENV"
  /usr/bin/python3 -c 'import venv, ensurepip' 2> /dev/null || apt_install python3-venv
  rm -rf "$VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "podman-compose==$PODMAN_COMPOSE_VERSION"
fi
compose() { "$VENV/bin/podman-compose" --project-name "$PROJECT" --env-file "$ENVFILE" -f "$FILE" "$@"; }

# --- images --------------------------------------------------------------------------------

IMAGE_TAG=compose-check
# The app images are built for this run from the current debug binaries (stripped), under a
# tag of the check's own, so they are never stale and a user's `dev` images are left alone.
say "building the binaries (cargo build -p hub -p producers) and notification-hub/{hub,services}:$IMAGE_TAG"
nice -n 10 "${CARGO:-cargo}" build -q -p hub -p producers
BIN=$(nice -n 10 "${CARGO:-cargo}" metadata --format-version 1 --no-deps \
  | /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug
log=$(mktemp)
infra/docker/images.sh --tag "$IMAGE_TAG" --prebuilt "$BIN" --strip > "$log" 2>&1 \
  || { tail -n 30 "$log" >&2; rm -f "$log"; die "building the images failed"; }
rm -f "$log"
infra/docker/standins/build.sh

# --- the stack -----------------------------------------------------------------------------

WORK=$(mktemp -d)
ENVFILE=$WORK/env
SSE_PID=""
cleanup() {
  local rc=$?
  if [[ -n $SSE_PID ]]; then kill "$SSE_PID" 2> /dev/null || true; fi
  if ((rc != 0)) && [[ -s $WORK/up.log ]]; then
    echo "compose check: failed; the state of the project's containers and their last log lines:" >&2
    podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '  {{.Names}} {{.Status}}' >&2 || true
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' 2> /dev/null); do
      echo "--- $c" >&2
      podman logs --tail 8 "$c" 2>&1 | sed 's/^/  /' >&2 || true
    done
  fi
  if [[ -f $ENVFILE ]]; then
    compose down -v -t 10 > "$WORK/down.log" 2>&1 || { tail -n 20 "$WORK/down.log" >&2; }
  fi
  # Whatever podman-compose left behind (an interrupted `up`): containers, network, volumes.
  podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f -t 0 > /dev/null 2>&1 || true
  podman network rm -f "${PROJECT}_default" > /dev/null 2>&1 || true
  podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman volume rm -f > /dev/null 2>&1 || true
  podman rmi -f "notification-hub/hub:$IMAGE_TAG" "notification-hub/services:$IMAGE_TAG" > /dev/null 2>&1 || true
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
declare -A PORT
for p in HUB_A_PORT HUB_B_PORT ORDER_PORT MODERATION_PORT PAYMENT_PORT DELIVERY_PORT PROMETHEUS_PORT; do
  PORT[$p]=$(free_port)
done
SECRET=$(openssl rand -hex 32)
{
  echo "HUB_JWT_SECRET=$SECRET"
  echo "HUB_API_KEY=$(openssl rand -hex 24)"
  echo "POSTGRES_PASSWORD=$(openssl rand -hex 12)"
  echo "DELIVERY_STEP_INTERVAL=1s"
  echo "IMAGE_TAG=$IMAGE_TAG"
  for p in "${!PORT[@]}"; do echo "$p=${PORT[$p]}"; done
} > "$ENVFILE"

# Start order: each service is brought up (`up -d --no-deps SERVICE`) once its depends_on
# conditions hold (service_started: running; service_healthy: its health check passed here;
# service_completed_successfully: exited 0). podman-compose's own `up` cannot be used as it is
# with podman < 4.6: it ignores service_healthy, and `--requires` on a one-shot that has
# completed makes podman refuse to start the dependents. A service is done when its health
# check passes, or, for a one-shot (no health check), when it has exited 0.
declare -A DEPS STARTED READY
while read -r s deps; do DEPS[$s]=$deps; done < <("$VENV/bin/python" - "$FILE" <<'PY'
import sys, yaml
services = yaml.safe_load(open(sys.argv[1]))["services"]
for name, svc in services.items():
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    print(name, " ".join(f"{d}:{(c or {}).get('condition', 'service_started')}" for d, c in deps.items()))
PY
)
((${#DEPS[@]})) || die "no services in $FILE"
container_of() {
  podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1" | head -n 1
}
deps_met() {
  local d
  for d in ${DEPS[$1]}; do
    case ${d#*:} in
      service_started) [[ -n ${STARTED[${d%%:*}]:-} ]] || return 1 ;;
      service_healthy | service_completed_successfully) [[ -n ${READY[${d%%:*}]:-} ]] || return 1 ;;
      *) die "$1: unknown depends_on condition ${d#*:}" ;;
    esac
  done
}

say "starting project $PROJECT in the order of its depends_on conditions (podman-compose $PODMAN_COMPOSE_VERSION)"
t_up=$SECONDS
deadline=$((SECONDS + TIMEOUT))
: > "$WORK/up.log"
while :; do
  pending=()
  for s in "${!DEPS[@]}"; do
    [[ -n ${READY[$s]:-} ]] && continue
    if [[ -z ${STARTED[$s]:-} ]]; then
      if deps_met "$s"; then
        compose up -d --no-deps "$s" >> "$WORK/up.log" 2>&1 || { tail -n 20 "$WORK/up.log" >&2; die "podman-compose up -d $s failed"; }
        STARTED[$s]=1
      else
        pending+=("$s(waiting for ${DEPS[$s]})")
        continue
      fi
    fi
    c=$(container_of "$s")
    [[ -n $c ]] || die "$s: no container after podman-compose up"
    read -r status code hc < <(podman inspect "$c" --format '{{.State.Status}} {{.State.ExitCode}} {{if .Config.Healthcheck}}hc{{else}}none{{end}}')
    if [[ $hc == none ]]; then
      if [[ $status == exited && $code == 0 ]]; then
        READY[$s]=1; say "$s: completed ($((SECONDS - t_up)) s)"
      elif [[ $status == exited ]]; then
        podman logs "$c" 2>&1 | tail -n 10 >&2; die "$s exited with $code"
      else
        pending+=("$s($status)")
      fi
    elif [[ $status == running ]] && podman healthcheck run "$c" > /dev/null 2>&1; then
      READY[$s]=1; say "$s: healthy ($((SECONDS - t_up)) s)"
    else
      pending+=("$s($status)")
    fi
  done
  ((${#pending[@]} == 0)) && break
  ((SECONDS < deadline)) || die "not healthy after $TIMEOUT s: ${pending[*]}"
  sleep 2
done
say "every service is healthy, $((SECONDS - t_up)) s after up"

# --- an order through the saga, watched on hub node B --------------------------------------

token() { podman run --rm --network none -e HUB_JWT_SECRET="$SECRET" notification-hub/hub:dev token --sub alice --ttl 1h --aud "$1"; }
HUB_TOKEN=$(token hub)
ORDER_TOKEN=$(token orders)

curl -sN --max-time 180 "http://127.0.0.1:${PORT[HUB_B_PORT]}/sse?token=$HUB_TOKEN" > "$WORK/sse" 2> "$WORK/sse.err" &
SSE_PID=$!
wait_for() { # PATTERN FILE SECONDS
  local until=$((SECONDS + $3))
  until grep -q -- "$1" "$2" 2> /dev/null; do
    ((SECONDS < until)) || return 1
    kill -0 "$SSE_PID" 2> /dev/null || return 1
    sleep 0.2
  done
}
wait_for '"hub.connected"' "$WORK/sse" 20 || die "no hub.connected on hub B's /sse: $(cat "$WORK/sse" "$WORK/sse.err")"

reply=$(curl -sS -w '\n%{http_code}' -H "Authorization: Bearer $ORDER_TOKEN" -H 'content-type: application/json' \
  -d '{"items":[{"product_id":"p1","quantity":2,"price_cents":14999}],"delivery_address":"1 Main St"}' \
  "http://127.0.0.1:${PORT[ORDER_PORT]}/orders")
[[ ${reply##*$'\n'} == 201 ]] || die "POST /orders answered: $reply"
ORDER_ID=$(/usr/bin/python3 -c 'import json, sys; print(json.loads(sys.argv[1])["order_id"])' "${reply%$'\n'*}")
say "order $ORDER_ID placed (201); waiting for its statuses on hub B"

wait_for '"DELIVERED"' "$WORK/sse" 120 || true
sleep 1 # a duplicate right after DELIVERED would show here
/usr/bin/python3 - "$WORK/sse" "$ORDER_ID" <<'PY' || die "the statuses on hub B are wrong (SSE stream above)"
import json, sys
want = ["CREATED", "PAID", "IN_TRANSIT", "OUT_FOR_DELIVERY", "DELIVERED"]
got, ids = [], []
for line in open(sys.argv[1], encoding="utf-8"):
    if not line.startswith("data:"):
        continue
    env = json.loads(line[5:])
    if env.get("type") == "order.status" and env.get("data", {}).get("order_id") == sys.argv[2]:
        got.append(env["data"].get("status"))
        ids.append(env.get("id"))
if got != want or len(set(ids)) != len(ids):
    print(open(sys.argv[1], encoding="utf-8").read(), file=sys.stderr)
    print(f"compose check: statuses {got}, want {want} (ids {ids})", file=sys.stderr)
    sys.exit(1)
print("compose check: hub B delivered " + " -> ".join(got) + ", each once, in order")
PY

# Prometheus (the compose-specific scrape config): every target up (first scrapes within 15 s).
until=$((SECONDS + 40))
while :; do
  targets=$(curl -fsS "http://127.0.0.1:${PORT[PROMETHEUS_PORT]}/api/v1/targets" 2> /dev/null || true)
  down=$(/usr/bin/python3 -c '
import json, sys
try:
    ts = json.loads(sys.argv[1])["data"]["activeTargets"]
except Exception:
    print("no answer"); sys.exit()
bad = [t["labels"]["job"] + "/" + t["labels"]["instance"] + ":" + t["health"] for t in ts if t["health"] != "up"]
print(" ".join(bad) if bad or len(ts) != 7 else "", end="")
' "$targets")
  [[ -z $down ]] && break
  ((SECONDS < until)) || die "Prometheus targets not all up after 40 s: $down"
  sleep 1
done
say "Prometheus scrapes both hub nodes, the four services and itself (7 targets up)"
say "passed in $((SECONDS - T0)) s"
