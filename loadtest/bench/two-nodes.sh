# shellcheck shell=bash
# Sourced by the two-node benchmarks (publish-path.sh, broadcast.sh, mixed.sh): a private
# redis-server on REDIS_PORT and hub nodes A (PORT_A) and B (PORT_B) on it, from BIN, with the
# benchmarks' secret and API key; every process started here is stopped on exit, also on
# failure (scratch.sh, unless the caller sourced it already). Sets: dir (a scratch directory),
# redis, a, b (process ids). Node B also gets the extra `VAR=value` words in NODE_B_ENV (e.g.
# its gRPC listener or its Kafka ingest).
[[ -x $BIN/hub && -x $BIN/hub-loadgen ]] || { echo "build first: cargo build --release -p hub -p loadtest" >&2; exit 1; }

# shellcheck source=loadtest/bench/scratch.sh
declare -F cleanup >/dev/null || source loadtest/bench/scratch.sh
private_redis "$REDIS_PORT"

export HUB_REDIS_URL=redis://127.0.0.1:$REDIS_PORT HUB_REDIS_PREFIX=bench HUB_LOG=warn
export HUB_JWT_SECRET=benchsecretbenchsecretbenchsecret01 HUB_API_KEY=benchkeybenchkey01
# One client address holds every connection here (resumes reconnect from it too).
export HUB_MAX_CONNECTIONS_PER_IP=1000000
HUB_ADDR=127.0.0.1:$PORT_A "$BIN/hub" serve & a=$!; pids+=("$a")
# shellcheck disable=SC2086 # NODE_B_ENV is a list of VAR=value words
env HUB_ADDR=127.0.0.1:$PORT_B ${NODE_B_ENV:-} "$BIN/hub" serve & b=$!; pids+=("$b")
for port in "$PORT_A" "$PORT_B"; do
  until curl -fs "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
done
