# Helpers shared by the scripts in infra/local (sourced, not run).

# terminate PID SECONDS: SIGTERM, then wait up to SECONDS for the process to exit; SIGKILL if it
# is still there. Returns 1 when it had to be killed, 0 otherwise (also when it was gone).
terminate() {
  local pid=$1 seconds=$2 deadline
  kill -TERM "$pid" 2>/dev/null || return 0
  deadline=$((SECONDS + seconds))
  while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  kill -0 "$pid" 2>/dev/null || return 0
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
  return 1
}
