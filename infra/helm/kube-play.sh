#!/usr/bin/env bash
# Smoke test of the chart (part of `make ops-check`): the hub Deployment as the chart renders it
# (one replica, the image built from the current debug binary, Redis at a local pod, Kafka
# pointed nowhere: ingest waits, readiness does not depend on it) and a
# Redis pod run with `podman kube play`; passes when the hub pod answers /readyz 200, i.e. it
# started under the chart's security context, probes and settings and reached Redis. Removes
# its pods and images afterwards. Needs podman (with runc, the cgroupfs manager: see
# infra/docker/containers.conf), catatonit, helm and python3-yaml; installs podman and
# catatonit when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/infra/docker/containers.conf}
TAG=kube-check
die() { echo "kube play: $*" >&2; exit 1; }
say() { echo "kube play: $*"; }

missing=()
command -v podman >/dev/null || missing+=(podman runc)
command -v catatonit >/dev/null || missing+=(catatonit)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
HELM=$(command -v helm || true)
if [[ -z $HELM ]] && command -v go >/dev/null && [[ -x $(go env GOPATH)/bin/helm ]]; then HELM=$(go env GOPATH)/bin/helm; fi
[[ -n $HELM ]] || die "helm missing; run infra/local/ops-deps.sh"

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
work=$(mktemp -d)
cleanup() {
  for f in "$work/hub-play.yaml" "$work/redis.yaml"; do
    if [[ -f $f ]]; then podman kube down "$f" >/dev/null 2>&1 || true; fi
  done
  podman rmi -f "notification-hub/hub:$TAG" "notification-hub/services:$TAG" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "building the binaries and notification-hub/{hub,services}:$TAG"
nice -n 10 "${CARGO:-cargo}" build -q -p hub -p producers
BIN=$(nice -n 10 "${CARGO:-cargo}" metadata --format-version 1 --no-deps \
  | /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug
infra/docker/images.sh --tag "$TAG" --prebuilt "$BIN" --strip > "$work/images.log" 2>&1 \
  || { tail -n 30 "$work/images.log" >&2; die "building the images failed"; }
infra/docker/standins/build.sh >/dev/null

redis_port=$(free_port)
hub_port=$(free_port)
cat > "$work/redis.yaml" <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: kube-check-redis
spec:
  containers:
    - name: redis
      image: docker.io/library/redis:7
      command: ["redis-server", "--port", "$redis_port", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
YAML
"$HELM" template kube-check infra/helm/notification-hub --kube-version 1.30.0 \
  --set image.hub.tag="$TAG" --set hub.replicas=1 --set hub.port="$hub_port" \
  --set external.redis.url="redis://127.0.0.1:$redis_port" --set external.kafka.brokers=127.0.0.1:1 \
  --show-only templates/hub-deployment.yaml > "$work/hub.yaml"
/usr/bin/python3 infra/helm/kube_play_prepare.py "$work/hub.yaml" "$work/hub-play.yaml" \
  "notification-hub-jwt/secret=$(openssl rand -hex 32)" \
  "notification-hub-api-key/api-key=$(openssl rand -hex 24)"

# Without systemd podman says it cannot schedule health checks; the readiness wait below is
# the check.
podman kube play --network host "$work/redis.yaml" >"$work/play.log" 2>&1 \
  || { cat "$work/play.log" >&2; die "the Redis pod did not start"; }
podman kube play --network host "$work/hub-play.yaml" >"$work/play.log" 2>&1 \
  || { cat "$work/play.log" >&2; die "the hub pod did not start"; }
say "pods started; waiting for the hub's /readyz on 127.0.0.1:$hub_port"
deadline=$((SECONDS + 60))
until [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$hub_port/readyz") == 200 ]]; do
  if ((SECONDS > deadline)); then
    podman ps -a --format '  {{.Names}} {{.Status}}' >&2
    for c in $(podman ps -a --format '{{.Names}}' | grep kube-check); do
      echo "--- $c" >&2; podman logs --tail 10 "$c" 2>&1 | sed 's/^/  /' >&2 || true
    done
    die "the hub pod did not answer /readyz 200 within 60 s"
  fi
  sleep 0.5
done
hub=$(podman ps --format '{{.Names}}' | grep -m1 -- '-hub-pod-0-hub$' || true)
[[ -n $hub ]] || die "the hub container was not found: $(podman ps --format '{{.Names}}' | tr '\n' ' ')"
uid=$(podman exec "$hub" id -u)
[[ $uid != 0 ]] || die "the hub container runs as root"
say "the hub Deployment runs (uid $uid, read-only root filesystem) and is ready on Redis: passed"
