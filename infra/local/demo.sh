#!/usr/bin/env bash
# Starts / stops the local demo: one hub node in dev mode on 127.0.0.1:8080, in the background.
# Credentials are written to .run/demo.env (git-ignored) so scripts can mint tokens and publish.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=.run
mkdir -p "$RUN"
HUB=target/release/hub

start() {
  if [[ -f $RUN/hub-a.pid ]] && kill -0 "$(cat $RUN/hub-a.pid)" 2>/dev/null; then
    echo "demo: already running (pid $(cat $RUN/hub-a.pid)); 'make stop' first to restart"
  else
    if [[ ! -f $RUN/demo.env ]]; then
      {
        echo "HUB_JWT_SECRET=$(openssl rand -hex 32)"
        echo "HUB_API_KEY=$(openssl rand -hex 24)"
      } > "$RUN/demo.env"
    fi
    set -a; source "$RUN/demo.env"; set +a
    HUB_ADDR=127.0.0.1:8080 HUB_LOG=info nohup "$HUB" serve --dev > "$RUN/hub-a.log" 2>&1 &
    echo $! > "$RUN/hub-a.pid"
  fi
  set -a; source "$RUN/demo.env"; set +a
  for _ in $(seq 1 100); do
    if curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1; then break; fi
    if ! kill -0 "$(cat $RUN/hub-a.pid)" 2>/dev/null; then
      echo "demo: the hub exited; see $RUN/hub-a.log:" >&2; tail -5 "$RUN/hub-a.log" >&2; exit 1
    fi
    sleep 0.1
  done
  curl -fsS http://127.0.0.1:8080/readyz >/dev/null || { echo "demo: hub not ready" >&2; exit 1; }
  token=$("$HUB" token --sub alice --ttl 1h)
  cat <<MSG

  The hub is running (dev mode).  Open:   http://127.0.0.1:8080/

  A token for user "alice":  $token

  Listen:   curl -N "http://127.0.0.1:8080/sse?token=$token"
  Publish:  curl -H "Authorization: Bearer \$HUB_API_KEY" \\
              -d '{"user_id":"alice","type":"promo","data":{"text":"hello"}}' \\
              http://127.0.0.1:8080/api/publish
            (HUB_API_KEY and HUB_JWT_SECRET are in .run/demo.env)
  Stop:     make stop

MSG
}

stop() {
  if [[ -f $RUN/hub-a.pid ]]; then
    pid=$(cat "$RUN/hub-a.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
    fi
    rm -f "$RUN/hub-a.pid"
    echo "demo: stopped"
  else
    echo "demo: nothing running"
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
