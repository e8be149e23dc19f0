#!/usr/bin/env bash
# Installs what the build and tests need and is missing (idempotent; Debian/Ubuntu).
set -euo pipefail

need_apt=()
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl)
command -v cc >/dev/null || need_apt+=(build-essential)
# librdkafka is built with OpenSSL (Kafka over TLS, SASL/SCRAM): headers and pkg-config to find
# them; the binaries load libssl3 at run time.
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
dpkg-query -W -f='${Status}' libssl-dev 2>/dev/null | grep -q 'ok installed' || need_apt+=(libssl-dev)
# kcat: the independent JSON producer of the Kafka ingest tests (and handy by hand).
command -v kcat >/dev/null || need_apt+=(kcat)
# The browser test: headless Chromium (Debian's package, /usr/bin/chromium) and a font, so
# that screenshots render text.
command -v chromium >/dev/null || need_apt+=(chromium)
dpkg-query -W -f='${Status}' fonts-dejavu-core 2>/dev/null | grep -q 'ok installed' || need_apt+=(fonts-dejavu-core)
# node + npm: the k6 scripts' type check (`make k6-check`).
command -v npm >/dev/null || need_apt+=(nodejs npm)
# PostgreSQL is not installed here but by infra/local/postgres.sh start (one place), which keeps
# the package from creating and starting a cluster of its own.

if ((${#need_apt[@]})); then
  echo "deps: installing ${need_apt[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "deps: cargo not found; install Rust with rustup (https://rustup.rs) and retry" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
