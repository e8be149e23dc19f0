#!/usr/bin/env bash
# The dashboards' queries against a live Prometheus (part of `make ops-check`): builds the hub
# and the producer services (debug) when needed, starts the local Kafka and PostgreSQL unless
# they run (and stops afterwards only what it started, also on failure or interrupt), then runs
# infra/grafana/live_check.py (see its header). About a minute once built.
# Needs Debian's prometheus, python3-yaml and kcat (infra/local/ops-deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."

die() { echo "dashboards: $*" >&2; exit 1; }
[[ -x /usr/bin/prometheus ]] || die "/usr/bin/prometheus missing; run infra/local/ops-deps.sh"
command -v kcat >/dev/null || die "kcat missing; run infra/local/ops-deps.sh"
/usr/bin/python3 -c 'import yaml' 2>/dev/null || die "python3-yaml missing; run infra/local/ops-deps.sh"

CARGO=${CARGO:-cargo}
echo "dashboards: $CARGO build -p hub -p producers"
nice -n 10 "$CARGO" build -q -p hub -p producers
# The binaries' directory, wherever the target directory is (CARGO_TARGET_DIR, config).
OPS_CHECK_BIN=$("$CARGO" metadata --format-version 1 --no-deps \
  | /usr/bin/python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug
export OPS_CHECK_BIN

rec=$(mktemp)
trap 'infra/local/infra.sh down --only kafka,postgres --record "$rec"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
infra/local/infra.sh up --only kafka,postgres --record "$rec"
/usr/bin/python3 infra/grafana/live_check.py
