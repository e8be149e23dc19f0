#!/usr/bin/env bash
# Checks the images (part of `make ops-check`): installs podman and runc when missing, builds
# the hub and the services (debug) when needed, builds both images from those binaries
# (images.sh --prebuilt <target dir>/debug --strip, tag `check`), then:
#   the default target's build stage copies a complete workspace (check_context.py; that
#   target itself is not built here: it needs rust:1-bookworm from a registry);
#   both images run as uid/gid 10001;
#   the hub image, run with a read-only root filesystem and no capabilities, answers /readyz,
#   accepts a publish, and exits 0 on SIGTERM after draining;
#   each service binary in the services image runs and stops with its one-line configuration
#   error (exit 2) when given no settings.
# Removes its container and images afterwards, also on failure. About half a minute once the
# base image exists (its first build takes about a minute more).
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { echo "images check: $*"; }
die() { echo "images check: $*" >&2; exit 1; }

if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  say "installing the Debian packages podman and runc"
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc
fi
if [[ -z ${CONTAINERS_CONF:-} && ! -d /run/systemd/system ]]; then
  export CONTAINERS_CONF=$PWD/infra/docker/containers.conf
fi

CARGO=${CARGO:-cargo}
say "$CARGO build -p hub -p producers"
nice -n 10 "$CARGO" build -q -p hub -p producers
BIN=$("$CARGO" metadata --format-version 1 --no-deps \
  | /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug

TAG=check
HUB=notification-hub/hub:$TAG
SERVICES=notification-hub/services:$TAG
NAME=ops-check-hub-$$
LOG=$(mktemp)
cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  podman rmi -f "$HUB" "$SERVICES" >/dev/null 2>&1 || true
  rm -f "$LOG"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The default target compiles in rust:1-bookworm, which this check does not pull: check instead
# that its build stage copies a complete workspace.
/usr/bin/python3 infra/docker/check_context.py infra/docker/hub.Dockerfile infra/docker/services.Dockerfile

infra/docker/images.sh --tag "$TAG" --prebuilt "$BIN" --strip > "$LOG" 2>&1 \
  || { tail -n 30 "$LOG" >&2; die "building the images failed"; }
say "built $HUB and $SERVICES"

for image in "$HUB" "$SERVICES"; do
  user=$(podman image inspect "$image" --format '{{.Config.User}}')
  [[ $user == 10001:10001 ]] || die "$image runs as '$user', not 10001:10001"
  [[ $(podman run --rm --entrypoint id "$image" -u) == 10001 ]] || die "$image: the process is not uid 10001"
done
say "both images run as uid/gid 10001"

# The hub, as Kubernetes runs it (read-only root, no capabilities, no privilege escalation).
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key=$(openssl rand -hex 24)
podman run -d --name "$NAME" --network host --read-only --cap-drop ALL --security-opt no-new-privileges \
  -e HUB_ADDR="127.0.0.1:$port" -e HUB_JWT_SECRET="$(openssl rand -hex 32)" -e HUB_API_KEY="$key" \
  -e HUB_DRAIN_WINDOW=1s "$HUB" > /dev/null
deadline=$((SECONDS + 30))
until curl -fsS "http://127.0.0.1:$port/readyz" > /dev/null 2>&1; do
  if ((SECONDS > deadline)) || [[ $(podman inspect "$NAME" --format '{{.State.Running}}') != true ]]; then
    podman logs "$NAME" 2>&1 | tail -n 20 >&2
    die "the hub container did not become ready on 127.0.0.1:$port within 30 s"
  fi
  sleep 0.2
done
status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" -H 'content-type: application/json' \
  -d '{"user_id":"alice","type":"check","data":{}}' "http://127.0.0.1:$port/api/publish")
[[ $status == 200 ]] || die "publish to the hub container answered $status"
podman stop -t 20 "$NAME" > /dev/null
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
[[ $code == 0 ]] || { podman logs "$NAME" 2>&1 | tail -n 20 >&2; die "the hub container exited with $code after SIGTERM, not 0"; }
# (The log is read whole first: `grep -q` on a pipe would end podman early, failing pipefail.)
logs=$(podman logs "$NAME" 2>&1)
[[ $logs == *"SIGTERM received"* ]] || die "the hub container's log shows no SIGTERM drain: $logs"
say "the hub image serves (readyz, publish) read-only without capabilities, and drains on SIGTERM (exit 0)"

for bin in order payment delivery moderation; do
  prefix=$(tr '[:lower:]' '[:upper:]' <<< "$bin")
  set +e
  out=$(podman run --rm --read-only --cap-drop ALL "$SERVICES" "$bin-service" 2>&1)
  code=$?
  set -e
  [[ $code == 2 && $out == *"${prefix}_"* ]] || die "$bin-service in $SERVICES: exit $code, output: $out"
done
say "the four service binaries run in the services image (each refuses to start without settings: exit 2)"
say "passed"
