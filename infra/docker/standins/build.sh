#!/usr/bin/env bash
# Builds the stand-in images infra/compose/compose.yaml runs when no container registry can be
# reached, each tagged with the upstream name compose.yaml refers to, so that the compose file
# is the same for everyone (with a registry, pull the real images instead and skip this):
#   docker.io/library/redis:7          redis.Dockerfile       Debian's redis-server 7.0
#   docker.io/library/postgres:16      postgres.Dockerfile    Debian's PostgreSQL 15
#   docker.io/prom/prometheus:v2.53.4  prometheus.Dockerfile  Debian's prometheus 2.42
#   docker.io/apache/kafka:KAFKA       kafka.Dockerfile       Debian's Java 17 and the Kafka jars
#                                                             of infra/kafka/pom.xml (KAFKA)
#
#   infra/docker/standins/build.sh [--force] [NAME...]   (NAME: redis postgres prometheus kafka)
#
# An image already present is kept (whether a stand-in or the upstream one) unless --force.
# Each builds FROM debian:bookworm-slim (infra/docker/images.sh makes it locally when missing)
# and installs from the Debian mirror. The Kafka jars come from the local Maven repository,
# resolved by infra/local/kafka.sh (from Maven Central) when missing. podman (or
# IMAGES_ENGINE=docker); without systemd, CONTAINERS_CONF defaults to infra/docker/containers.conf.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$ROOT"
HERE=infra/docker/standins

KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' infra/kafka/pom.xml | head -n 1)
declare -A IMAGE=(
  [redis]=docker.io/library/redis:7
  [postgres]=docker.io/library/postgres:16
  [prometheus]=docker.io/prom/prometheus:v2.53.4
  [kafka]=docker.io/apache/kafka:$KAFKA_VERSION
)

say() { echo "standins: $*"; }
die() { echo "standins: $*" >&2; exit 1; }

FORCE=0
names=()
for a in "$@"; do
  case $a in
    --force) FORCE=1 ;;
    redis | postgres | prometheus | kafka) names+=("$a") ;;
    --print) for n in redis postgres prometheus kafka; do echo "${IMAGE[$n]}"; done; exit 0 ;;
    *) echo "usage: $0 [--force] [--print] [redis|postgres|prometheus|kafka ...]" >&2; exit 2 ;;
  esac
done
((${#names[@]})) || names=(redis postgres prometheus kafka)

ENGINE=${IMAGES_ENGINE:-podman}
command -v "$ENGINE" > /dev/null || die "$ENGINE not found (Debian: apt-get install podman runc)"
if [[ $ENGINE == podman && -z ${CONTAINERS_CONF:-} && ! -d /run/systemd/system ]]; then
  export CONTAINERS_CONF=$ROOT/infra/docker/containers.conf
fi
present() { "$ENGINE" image inspect "$1" > /dev/null 2>&1; }

present debian:bookworm-slim \
  || die "debian:bookworm-slim is missing: infra/docker/images.sh (make images-prebuilt) makes it locally, or pull it"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

# The Kafka build context: the jars of infra/kafka/pom.xml's runtime classpath (the one
# infra/local/kafka.sh runs the local broker with), the scripts, the start script.
kafka_context() {
  local cp=.run/kafka/classpath.txt f
  # run-class resolves the classpath first (Maven, once) when it is missing or stale.
  infra/local/kafka.sh run-class kafka.tools.StorageTool random-uuid > /dev/null
  [[ -s $cp ]] || die "no Kafka classpath in $cp"
  mkdir -p "$ctx/kafka/libs"
  local IFS=:
  for f in $(< "$cp"); do cp "$f" "$ctx/kafka/libs/"; done
  unset IFS
  cp -r "$HERE/kafka/bin" "$HERE/kafka/run" "$ctx/kafka/"
}

for n in "${names[@]}"; do
  img=${IMAGE[$n]}
  if ((!FORCE)) && present "$img"; then
    say "$img present"
    continue
  fi
  dir=$HERE
  if [[ $n == kafka ]]; then
    kafka_context
    dir=$ctx/kafka
  fi
  say "building $img ($HERE/$n.Dockerfile)"
  t0=$SECONDS
  nice -n 10 "$ENGINE" build --pull=never -q -f "$HERE/$n.Dockerfile" -t "$img" \
    --label org.opencontainers.image.description="notification-hub stand-in for $img" "$dir" > /dev/null
  say "built $img in $((SECONDS - t0)) s"
done
