#!/usr/bin/env bash
# The scaling benchmark (docs/benchmarks.md, docs/scaling.md): a private Redis Cluster of
# SHARDS masters (no replicas, so every Redis process measured is a shard doing the work),
# NODES hub nodes on it (HUB_REDIS_CLUSTER_URLS), CONNECTIONS connections of as many users
# spread over the nodes (connection j on node j % NODES) and RATE notifications/s published
# through the nodes round-robin, so most deliveries cross nodes as in production. Reports
# server CPU per delivery split by process: each hub node and each shard.
#
#   loadtest/bench/cluster-scale.sh NODES TRANSPORT [extra hub-loadgen args...]
#     NODES      1 .. 8
#     TRANSPORT  ws | sse | mixed
#   Environment: SHARDS (3), CONNECTIONS (10000), RATE (5000), DURATION (20s),
#                MODE (http | batch: --publish-mode), BATCH (100), REDIS_BASE (6400: shards
#                on REDIS_BASE+1 ..), PORT_BASE (9110: nodes on PORT_BASE+1 ..), BIN_DIR
#                (target/release)
#
# Needs release builds (`cargo build --release -p hub -p loadtest`) and redis-server with
# redis-cli. Stops everything it started, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
NODES=${1:?usage: cluster-scale.sh NODES ws|sse|mixed}
TRANSPORT=${2:?usage: cluster-scale.sh NODES ws|sse|mixed}
shift 2
((NODES >= 1 && NODES <= 8)) || { echo "NODES must be 1..8" >&2; exit 2; }
SHARDS=${SHARDS:-3} CONNECTIONS=${CONNECTIONS:-10000} RATE=${RATE:-5000} DURATION=${DURATION:-20s}
MODE=${MODE:-http} BATCH=${BATCH:-100} REDIS_BASE=${REDIS_BASE:-6400} PORT_BASE=${PORT_BASE:-9110}
BIN=${BIN_DIR:-target/release}
[[ -x $BIN/hub && -x $BIN/hub-loadgen ]] || { echo "build first: cargo build --release -p hub -p loadtest" >&2; exit 1; }
((SHARDS >= 3)) || { echo "a Redis Cluster needs at least 3 masters (SHARDS)" >&2; exit 2; }

# shellcheck source=loadtest/bench/scratch.sh
source loadtest/bench/scratch.sh

cpu=() seeds=() addrs=()
for ((i = 1; i <= SHARDS; i++)); do
  port=$((REDIS_BASE + i))
  mkdir -p "$dir/$port"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir/$port" \
    --cluster-enabled yes --cluster-config-file "$dir/$port/nodes.conf" --loglevel warning \
    >/dev/null &
  pids+=("$!"); cpu+=(--cpu-pid "shard-$i=$!")
  seeds+=("redis://127.0.0.1:$port"); addrs+=("127.0.0.1:$port")
done
for a in "${addrs[@]}"; do until redis-cli -p "${a#*:}" ping >/dev/null 2>&1; do sleep 0.1; done; done
redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 \
  || { cat "$dir/create.log" >&2; exit 1; }
for a in "${addrs[@]}"; do
  until redis-cli -p "${a#*:}" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
done

HUB_REDIS_CLUSTER_URLS=$(IFS=,; echo "${seeds[*]}")
export HUB_REDIS_CLUSTER_URLS
export HUB_REDIS_PREFIX=bench HUB_LOG=warn
export HUB_JWT_SECRET=benchsecretbenchsecretbenchsecret01 HUB_API_KEY=benchkeybenchkey01
# One client address holds every connection here.
export HUB_MAX_CONNECTIONS_PER_IP=1000000
hubs=() via=() servers=()
for ((i = 1; i <= NODES; i++)); do
  port=$((PORT_BASE + i))
  HUB_ADDR=127.0.0.1:$port "$BIN/hub" serve & pids+=("$!")
  cpu+=(--cpu-pid "node-$i=$!"); servers+=(--server-pid "$!")
  hubs+=(--hub "http://127.0.0.1:$port"); via+=(--publish-via "http://127.0.0.1:$port")
done
for ((i = 1; i <= NODES; i++)); do
  until curl -fs "http://127.0.0.1:$((PORT_BASE + i))/readyz" >/dev/null; do sleep 0.1; done
done

args=(--publish-mode "$MODE")
[[ $MODE == batch ]] && args+=(--batch-size "$BATCH")
"$BIN/hub-loadgen" run "${hubs[@]}" "${via[@]}" \
  --jwt-secret "$HUB_JWT_SECRET" --api-key "$HUB_API_KEY" --transport "$TRANSPORT" \
  --connections "$CONNECTIONS" --rate "$RATE" --duration "$DURATION" --hold 3s --drain 5s \
  --source-port-base 20000 "${servers[@]}" "${cpu[@]}" "${args[@]}" "$@"
