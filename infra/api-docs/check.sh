#!/usr/bin/env bash
# `make api-docs-check`: validates the OpenAPI 3.1 documents the HTTP servers serve at
# /api/openapi.json (a hub node, the order service, the moderation service) and
# docs/asyncapi.yaml with independent validators (check.mjs). Fails, never skips.
#
# Builds the hub and the producer services (debug), starts the local Kafka and PostgreSQL
# unless they run (infra/local/infra.sh; afterwards it stops only what it started), gives each
# service a database of its own (infra/local/postgres.sh createdb, a random name) and a topic
# prefix of its own, starts the three servers on free loopback ports, validates, then stops
# every process it started and drops its databases: on success, failure or interrupt.
# API_DOCS_EXTRA_URLS: more documents to validate (space-separated URLs of running servers).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
die() { echo "api-docs: $*" >&2; exit 1; }
command -v npm >/dev/null || die "npm not found; install Node.js 18+ with npm"
npm ci --no-audit --no-fund --loglevel=error >/dev/null

CARGO=${CARGO:-cargo}
(cd "$ROOT" && nice -n 10 "$CARGO" build -q -p hub -p producers --bins)
# The binaries' directory, wherever the target directory is (CARGO_TARGET_DIR, config).
BIN=$(cd "$ROOT" && "$CARGO" metadata --format-version 1 --no-deps \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug

run_id=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
work=$(mktemp -d)
rec=$work/infra-record
pids=()
dbs=()

cleanup() {
  local rc=$? pid db psql=psql url f
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if ((${#dbs[@]})); then
    for f in /usr/lib/postgresql/*/bin/psql; do [[ -x $f ]] && psql=$f; done
    url=$("$ROOT/infra/local/postgres.sh" url postgres 2>/dev/null || true)
    for db in "${dbs[@]}"; do
      "$psql" -X -qtA -d "$url" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
        || echo "api-docs: could not drop database $db" >&2
    done
  fi
  if [[ -f $rec ]]; then
    "$ROOT/infra/local/infra.sh" down --only kafka,postgres --record "$rec" >/dev/null || rc=1
  fi
  if ((rc != 0)) && compgen -G "$work/*.log" >/dev/null; then
    for log in "$work"/*.log; do
      echo "--- $(basename "$log") (last lines)" >&2
      tail -n 20 "$log" >&2
    done
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$ROOT/infra/local/infra.sh" up --only kafka,postgres --record "$rec" >/dev/null

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until `url` answers 200, or fails when process `pid` (named `name`) exits first or
# 30 s pass.
wait_ready() {
  local name=$1 pid=$2 url=$3 _
  for _ in $(seq 1 300); do
    curl -fs "$url" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || die "$name exited at start (its log follows)"
    sleep 0.1
  done
  die "$name not ready at $url within 30 s"
}

secret=api-docs-check-secret-0123456789abcdef
urls=()

hub_port=$(free_port)
HUB_ADDR=127.0.0.1:$hub_port HUB_JWT_SECRET=$secret HUB_API_KEY=api-docs-check-key HUB_LOG=warn \
  "$BIN/hub" serve >"$work/hub.log" 2>&1 &
pids+=($!)
wait_ready hub "${pids[-1]}" "http://127.0.0.1:$hub_port/healthz"
urls+=("http://127.0.0.1:$hub_port/api/openapi.json")

for service in order moderation; do
  up=${service^^}
  db=apidocs_${run_id}_$service
  "$ROOT/infra/local/postgres.sh" createdb "$db" >/dev/null
  dbs+=("$db")
  port=$(free_port)
  # Only the settings given here: none of the shell's ORDER_* / MODERATION_* variables.
  unset_args=()
  while read -r v; do unset_args+=(-u "$v"); done < <(compgen -e | grep "^${up}_" || true)
  env "${unset_args[@]}" \
    "${up}_ADDR=127.0.0.1:$port" \
    "${up}_DATABASE_URL=$("$ROOT/infra/local/postgres.sh" url "$db")" \
    "${up}_DATABASE_POOL_SIZE=2" \
    "${up}_KAFKA_BROKERS=127.0.0.1:${LOCAL_KAFKA_PORT:-9092}" \
    "${up}_KAFKA_GROUP=apidocs-$run_id-$service" \
    "${up}_TOPIC_PREFIX=apidocs-$run_id." \
    "${up}_JWT_SECRET=$secret" \
    "${up}_LOG=warn" \
    "$BIN/$service-service" >"$work/$service.log" 2>&1 &
  pids+=($!)
  wait_ready "$service-service" "${pids[-1]}" "http://127.0.0.1:$port/readyz"
  urls+=("http://127.0.0.1:$port/api/openapi.json")
done

# shellcheck disable=SC2086 # API_DOCS_EXTRA_URLS is a space-separated list.
node check.mjs "${urls[@]}" ${API_DOCS_EXTRA_URLS:-}
