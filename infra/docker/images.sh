#!/usr/bin/env bash
# Builds the two images (`make images`):
#   notification-hub/hub:TAG        from infra/docker/hub.Dockerfile
#   notification-hub/services:TAG   from infra/docker/services.Dockerfile
#
#   infra/docker/images.sh [--tag TAG] [--prebuilt DIR [--strip]]
#
# By default the binaries are compiled inside the build (target `runtime`: rust:1-bookworm,
# then debian:bookworm-slim), from the repository as the build context. With --prebuilt DIR the
# binaries already built in DIR (e.g. target/release after `make build-release`) are copied into
# the same runtime (target `prebuilt`), through a build context holding only them; --strip
# strips their debug info first (for debug builds).
#
# Engine: IMAGES_ENGINE, else podman when installed, else docker. With podman on a machine
# without systemd (a container or sandbox), CONTAINERS_CONF defaults to
# infra/docker/containers.conf (runc, cgroupfs, host network for builds).
# The base image debian:bookworm-slim is used as it is when present locally. When it is missing
# and the engine is podman, it is made locally (Debian's mmdebstrap, minbase variant without
# docs, man pages and locales, as the official slim image) and tagged
# docker.io/library/debian:bookworm-slim, so that no container registry is needed; pull the
# official image first to use that one instead. rust:1-bookworm (default target only) comes
# from the engine's registry.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

TAG=dev
PREBUILT=""
STRIP=0
while (($#)); do
  case $1 in
    --tag) TAG=${2:?--tag needs a value}; shift 2 ;;
    --prebuilt) PREBUILT=${2:?--prebuilt needs a directory}; shift 2 ;;
    --strip) STRIP=1; shift ;;
    *) echo "usage: $0 [--tag TAG] [--prebuilt DIR [--strip]]" >&2; exit 2 ;;
  esac
done

say() { echo "images: $*"; }
die() { echo "images: $*" >&2; exit 1; }

ENGINE=${IMAGES_ENGINE:-}
if [[ -z $ENGINE ]]; then
  if command -v podman >/dev/null; then ENGINE=podman
  elif command -v docker >/dev/null; then ENGINE=docker
  else die "neither podman nor docker found; install one (Debian: apt-get install podman runc)"
  fi
fi
if [[ $ENGINE == podman && -z ${CONTAINERS_CONF:-} && ! -d /run/systemd/system ]]; then
  export CONTAINERS_CONF=$ROOT/infra/docker/containers.conf
fi

BASE=debian:bookworm-slim
base_present() { "$ENGINE" image inspect "$BASE" >/dev/null 2>&1; }

make_base() {
  if ! command -v mmdebstrap >/dev/null; then
    command -v apt-get >/dev/null || die "$BASE is missing and mmdebstrap cannot be installed; pull $BASE and retry"
    say "installing the Debian package mmdebstrap (to make $BASE locally)"
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap
  fi
  local tmp
  tmp=$(mktemp -d)
  say "making $BASE locally with mmdebstrap (minbase, bookworm; about half a minute)"
  # The hook's "$1" is expanded by mmdebstrap (the root directory), not here.
  # shellcheck disable=SC2016
  if ! mmdebstrap --quiet --variant=minbase \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
      bookworm "$tmp/rootfs.tar" > "$tmp/log" 2>&1; then
    tail -n 20 "$tmp/log" >&2
    rm -rf "$tmp"
    die "mmdebstrap failed"
  fi
  "$ENGINE" import --change 'CMD ["bash"]' "$tmp/rootfs.tar" "docker.io/library/$BASE" > /dev/null
  rm -rf "$tmp"
}

if ! base_present; then
  if [[ $ENGINE == podman ]]; then
    make_base
  else
    say "$BASE is not present locally; $ENGINE pulls it"
  fi
fi

build() {
  local name=$1 file=$2 ctx=$3; shift 3
  say "building notification-hub/$name:$TAG ($ENGINE, $file${PREBUILT:+, prebuilt from $PREBUILT})"
  local pull=()
  base_present && [[ -n $PREBUILT ]] && pull=(--pull=never)
  "$ENGINE" build "${pull[@]}" -f "$ROOT/$file" -t "notification-hub/$name:$TAG" "$@" "$ctx"
}

if [[ -n $PREBUILT ]]; then
  [[ -d $PREBUILT ]] || die "--prebuilt $PREBUILT: not a directory"
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  mkdir "$ctx/bin"
  for b in hub order-service payment-service delivery-service moderation-service; do
    [[ -x $PREBUILT/$b ]] || die "$PREBUILT/$b missing (cargo build --release -p hub -p producers)"
    cp "$PREBUILT/$b" "$ctx/bin/$b"
    if ((STRIP)); then strip --strip-debug "$ctx/bin/$b"; fi
  done
  build hub infra/docker/hub.Dockerfile "$ctx" --target prebuilt --build-arg BIN_DIR=bin
  build services infra/docker/services.Dockerfile "$ctx" --target prebuilt --build-arg BIN_DIR=bin
else
  build hub infra/docker/hub.Dockerfile "$ROOT"
  build services infra/docker/services.Dockerfile "$ROOT"
fi
say "built notification-hub/hub:$TAG and notification-hub/services:$TAG"
