#!/usr/bin/env bash
# Local PostgreSQL for tests and the demo, without Docker or systemd (Debian/Ubuntu).
#
#   infra/local/postgres.sh start        install the Debian package postgresql if missing, create
#                                        our own cluster (once), start it on
#                                        127.0.0.1:${LOCAL_PG_PORT:-5432}, wait until it accepts
#                                        connections, and make sure the login role notify/notify
#                                        (CREATEDB) exists
#   infra/local/postgres.sh stop         stop the instance this script started (nothing else)
#   infra/local/postgres.sh status       one line; exit 0 when a PostgreSQL accepts connections
#                                        on the port, 3 when not
#   infra/local/postgres.sh createdb NAME
#                                        create database NAME owned by notify unless it exists
#   infra/local/postgres.sh url [DB]     print the URL the services and tests use, e.g.
#                                        postgres://notify:notify@127.0.0.1:5432/DB (DB: postgres)
#
# Our cluster lives in .run/postgres/ (git-ignored):
#   data/          the data directory (initdb once; delete it, stopped, to start afresh); its
#                  postmaster.pid is how `stop` knows the instance is ours
#   postgres.log   the server log; initdb.log: the output of initdb
#   .s.PGSQL.PORT  the Unix socket (only the cluster's owner may use it; the script uses it as
#                  the superuser, everything else connects over TCP with the URL)
# and .run/postgres.lock serialises concurrent starts and stops.
# PostgreSQL refuses to run as root: when this script runs as root, initdb and the server run as
# the `postgres` system user (created by the package), which owns .run/postgres/. If that user
# cannot reach .run/ (a parent directory of the repo is not traversable, e.g. a repo under
# /root), or the socket path would be too long, the files go to
# /var/tmp/notify-hub-postgres-<hash of the repo path>/ instead and .run/postgres is a symlink
# to it. `start` prints where they are.
#
# The package's own cluster: before installing, a drop-in in /etc/postgresql-common/
# createcluster.d/ turns off the creation of the package's `main` cluster, and the Debian
# policy-rc.d hook keeps the package's service from starting (both removed afterwards). If a
# Debian-managed cluster (pg_lsclusters) nevertheless runs on our port, `start` stops it with
# pg_ctlcluster (its configuration is not changed; `pg_ctlcluster VERSION NAME start` restarts
# it). If something already accepts notify/notify on the port (e.g. a CI service container),
# `start` reuses it and `stop` leaves it alone; anything else on the port is an error.
# When INFRA_RECORD names a file, `start` appends "postgres" to it if it launched the server, so
# a caller (infra.sh up --record, used by `make test`) can stop only what it started.
# Settings: LOCAL_PG_PORT (default 5432), LOCAL_PG_START_TIMEOUT (seconds, default 60).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PORT=${LOCAL_PG_PORT:-5432}
HOST=127.0.0.1
APP_USER=notify
APP_PASSWORD=notify
LINK=$ROOT/.run/postgres
START_SECONDS=${LOCAL_PG_START_TIMEOUT:-60}
STOP_SECONDS=30 # fast shutdown, then immediate, then SIGKILL

say() { echo "postgres: $*"; }
die() { echo "postgres: $*" >&2; exit 1; }

if ! [[ $PORT =~ ^[1-9][0-9]{0,4}$ ]] || ((PORT > 65535)); then
  die "LOCAL_PG_PORT must be a port number, got '$PORT'"
fi
[[ $START_SECONDS =~ ^[0-9]+$ ]] || die "LOCAL_PG_START_TIMEOUT must be a number of seconds, got '$START_SECONDS'"

# libpq and the server tools read PG* variables (PGUSER, PGSSLMODE, PGDATA, ...); everything
# here is explicit, so none of them may change what the script does.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^PG' || true)

AS_ROOT=0
[[ $(id -u) -eq 0 ]] && AS_ROOT=1
SUDO=""
((AS_ROOT)) || SUDO=sudo

# Where our files are (.run/postgres, or the directory it links to); nothing is created here.
DIR=$(readlink -m "$LINK")
DATA=$DIR/data
LOG=$DIR/postgres.log

# Runs a server tool as the cluster's owner: `postgres` when we are root, else ourselves.
# From / so that the tool does not trip over a current directory it cannot read.
run_pg() {
  if ((AS_ROOT)); then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# The newest PostgreSQL bin directory of the Debian packages, empty when there is none.
newest_bin() {
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/pg_ctl && -x $d/initdb && -x $d/postgres && -x $d/psql && -x $d/pg_isready ]] || continue
    if [[ -z $best ]] || [[ $(printf '%s\n%s\n' "$best" "$d" | sort -V | tail -n 1) == "$d" ]]; then best=$d; fi
  done
  echo "$best"
}

# Sets BIN: the binaries matching our data directory's version when it exists, else the newest.
# (PATH is not used: /usr/local/bin may hold other pg_ctl/initdb links.)
find_bin() {
  local want=""
  [[ -f $DATA/PG_VERSION ]] && want=$(tr -dc '0-9.' < "$DATA/PG_VERSION")
  if [[ -n $want ]]; then
    BIN=/usr/lib/postgresql/$want/bin
    [[ -x $BIN/pg_ctl && -x $BIN/postgres && -x $BIN/psql ]] \
      || die "$DATA was created by PostgreSQL $want, whose binaries are missing; install postgresql-$want, or delete $DATA to start afresh"
  else
    BIN=$(newest_bin)
    [[ -n $BIN ]] || die "no PostgreSQL binaries under /usr/lib/postgresql/*/bin; run $0 start to install them"
  fi
}

install_pg() {
  if [[ -n $(newest_bin) ]]; then
    if ((AS_ROOT)) && ! getent passwd postgres >/dev/null; then
      die "the postgres system user is missing (PostgreSQL refuses to run as root); reinstall postgresql-common or create it (adduser --system --group postgres)"
    fi
    return 0
  fi
  command -v apt-get >/dev/null || die "PostgreSQL is missing and apt-get is not available; install PostgreSQL and retry"
  say "PostgreSQL not found under /usr/lib/postgresql; installing the Debian package postgresql"
  # We run our own cluster: keep the package from creating its `main` cluster (a drop-in read
  # by its postinst through createcluster.conf's include_dir) and its service from starting
  # (the standard Debian policy-rc.d hook). Each only when absent, removed again afterwards.
  local ccdir=/etc/postgresql-common/createcluster.d made_dir=0
  local dropin=$ccdir/zz-notify-hub-no-main-cluster.conf made_dropin=0
  local policy=/usr/sbin/policy-rc.d made_policy=0 rc=0
  if [[ ! -d $ccdir ]]; then $SUDO mkdir -p "$ccdir" && made_dir=1; fi
  if [[ ! -e $dropin ]]; then
    echo "create_main_cluster = false # temporary, written by $0 while installing" \
      | $SUDO tee "$dropin" >/dev/null && made_dropin=1
  fi
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod 755 "$policy" && made_policy=1
  fi
  $SUDO apt-get update -qq || rc=$?
  if ((rc == 0)); then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql || rc=$?
  fi
  if ((made_policy)); then $SUDO rm -f "$policy"; fi
  if ((made_dropin)); then $SUDO rm -f "$dropin"; fi
  if ((made_dir)); then $SUDO rmdir "$ccdir" 2>/dev/null || true; fi
  ((rc == 0)) || die "apt-get failed (exit $rc) while installing postgresql"
  [[ -n $(newest_bin) ]] || die "no PostgreSQL binaries under /usr/lib/postgresql/*/bin after installing postgresql"
  if ((AS_ROOT)); then
    getent passwd postgres >/dev/null || die "the postgres system user is missing after installing postgresql"
  fi
}

# Can the cluster's owner reach (search) this directory?
owner_reaches() {
  if ((AS_ROOT)); then (cd / && runuser -u postgres -- test -x "$1" 2>/dev/null); else test -x "$1"; fi
}

# Chooses and creates our directory (see the header), owned by the cluster's owner, mode 700.
prepare_dir() {
  mkdir -p "$ROOT/.run"
  if [[ ! -e $LINK && ! -L $LINK ]]; then
    local why=""
    if ! owner_reaches "$ROOT/.run"; then
      why="the postgres user cannot reach $ROOT/.run"
    elif ((${#LINK} + 20 > 107)); then
      why="the socket path under $LINK would be longer than 107 bytes"
    fi
    if [[ -n $why ]]; then
      local alt
      alt=/var/tmp/notify-hub-postgres-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)
      mkdir -p "$alt"
      ln -s "$alt" "$LINK"
      say "keeping the cluster in $alt ($why); .run/postgres links to it"
    else
      mkdir -p "$LINK"
    fi
  fi
  DIR=$(readlink -m "$LINK")
  DATA=$DIR/data
  LOG=$DIR/postgres.log
  mkdir -p "$DIR"
  if ((AS_ROOT)); then chown postgres:postgres "$DIR"; fi
  chmod 700 "$DIR"
  owner_reaches "$DIR" \
    || die "the postgres user cannot reach $DIR; delete $LINK (and what it links to) so that the script picks another place"
  ((${#DIR} + 20 <= 107)) || die "the socket path under $DIR would be too long; delete $LINK so that the script picks another place"
}

# The pid of the server this script started (postmaster.pid in our data directory), when it runs.
our_pid() {
  local f=$DATA/postmaster.pid pid
  [[ -f $f ]] || return 1
  pid=$(head -n 1 "$f" 2>/dev/null | tr -dc '0-9')
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a reused pid: it must still be a postgres.
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == postgres* ]] || return 1
  echo "$pid"
}

# The port our running server listens on (line 4 of postmaster.pid).
our_port() { sed -n 4p "$DATA/postmaster.pid" 2>/dev/null | tr -dc '0-9'; }

# Something accepts TCP connections on the port (any protocol).
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null; }

# A PostgreSQL accepts connections on the port.
pg_answers() {
  local isready
  isready=$(newest_bin)
  if [[ -n $isready ]]; then
    "$isready/pg_isready" -q -h "$HOST" -p "$PORT" -t 2
  else
    command -v pg_isready >/dev/null && pg_isready -q -h "$HOST" -p "$PORT" -t 2
  fi
}

url_for() { echo "postgres://$APP_USER:$APP_PASSWORD@$HOST:$PORT/$1"; }

# notify/notify can log in over TCP and run a query.
app_login_ok() {
  local psql
  psql=$(newest_bin)/psql
  [[ -x $psql ]] || psql=$(command -v psql) || return 1
  [[ $(PGCONNECT_TIMEOUT=5 "$psql" -X -qtA -d "$(url_for postgres)" -c 'select 1' 2>/dev/null) == 1 ]]
}

# "VERSION NAME" of each Debian-managed cluster that is online on our port.
debian_clusters_on_port() {
  command -v pg_lsclusters >/dev/null || return 0
  pg_lsclusters -h 2>/dev/null | awk -v p="$PORT" '$3 == p && $4 ~ /^online/ { print $1, $2 }'
}

valid_db() {
  [[ $1 =~ ^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$ ]] \
    || die "bad database name '$1' (letters, digits, _ and -, at most 63)"
}

init_cluster() {
  [[ -f $DATA/PG_VERSION ]] && return 0
  local tmp=$DATA.init locale=(--no-locale)
  # C.UTF-8 when the C library has it (a UTF-8 ctype), else plain C; UTF8 encoding either way.
  if locale -a 2>/dev/null | grep -qix 'c\.utf-\?8'; then locale=(--locale=C.UTF-8); fi
  rm -rf "$tmp"
  say "creating our cluster in $DATA (initdb, PostgreSQL $("$BIN/postgres" --version | awk '{print $3}'))"
  # The superuser is the cluster owner's name (postgres when run as root), reachable only
  # through our Unix socket (peer); TCP needs a password (scram-sha-256).
  if ! run_pg "$BIN/initdb" -D "$tmp" --encoding=UTF8 "${locale[@]}" \
      --auth-local=peer --auth-host=scram-sha-256 > "$DIR/initdb.log" 2>&1; then
    tail -n 20 "$DIR/initdb.log" >&2
    rm -rf "$tmp"
    die "initdb failed; log: $DIR/initdb.log"
  fi
  echo "include_if_exists = 'local.conf' # written by infra/local/postgres.sh at each start" >> "$tmp/postgresql.conf"
  mv "$tmp" "$DATA"
}

# The settings that follow the environment (port, paths), rewritten at each start.
write_conf() {
  local conf=$DATA/local.conf sock=${DIR//\'/\'\'}
  cat > "$conf" <<EOF
# Written by infra/local/postgres.sh at each start: edit the script, not this file.
listen_addresses = '$HOST'
port = $PORT
unix_socket_directories = '$sock'
unix_socket_permissions = 0700
max_connections = 200
password_encryption = 'scram-sha-256'
# A throwaway local instance for tests and the demo: speed over durability. With these, a
# crash of the machine (not of PostgreSQL) can lose recent commits or corrupt the data
# directory; delete it then. Never use these settings for data that matters.
fsync = off
synchronous_commit = off
full_page_writes = off
log_line_prefix = '%m [%p] %q%u@%d '
EOF
  if ((AS_ROOT)); then chown postgres:postgres "$conf"; fi
}

# Creates the application role, or resets its password and privileges (idempotent).
ensure_role() {
  run_pg "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR" -p "$PORT" -d postgres \
    -v app_user="$APP_USER" -v app_password="$APP_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I', :'app_user')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_user') \gexec
ALTER ROLE :"app_user" WITH LOGIN CREATEDB PASSWORD :'app_password';
SQL
}

# Fails with the message and the log lines of the last start (at most 20).
fail_start() {
  echo "postgres: $1; last lines of $LOG:" >&2
  { tac "$LOG" | sed '/^--- /q' | tac | tail -n 20; } >&2 2>/dev/null || true
  exit 1
}

start() {
  install_pg
  prepare_dir
  find_bin
  local pid
  if pid=$(our_pid); then
    local p
    p=$(our_port)
    [[ $p == "$PORT" ]] || die "our instance (pid $pid) runs on port $p, not $PORT; stop it first (LOCAL_PG_PORT=$p $0 stop)"
    # Ours runs: a no-op once it accepts connections (it may still be starting).
    local deadline=$((SECONDS + START_SECONDS))
    until pg_answers; do
      ((SECONDS < deadline)) || fail_start "our instance (pid $pid) does not accept connections on $HOST:$PORT after $START_SECONDS s"
      sleep 0.2
    done
    ensure_role
    say "already running (pid $pid) on $HOST:$PORT; data $DATA"
    return 0
  fi

  if port_open; then
    if app_login_ok; then
      say "$HOST:$PORT already accepts $APP_USER (a PostgreSQL this script did not start); reusing it"
      return 0
    fi
    local clusters
    clusters=$(debian_clusters_on_port)
    if [[ -n $clusters ]]; then
      local v n
      while read -r v n; do
        say "stopping the Debian-managed cluster $v/$n on port $PORT (we run our own; restart it with: pg_ctlcluster $v $n start)"
        $SUDO pg_ctlcluster "$v" "$n" stop || die "could not stop the Debian cluster $v/$n on port $PORT; stop it, or set LOCAL_PG_PORT"
      done <<< "$clusters"
    fi
    if port_open; then
      die "something else listens on $HOST:$PORT (not our instance, and $APP_USER/$APP_PASSWORD cannot log in); free the port or set LOCAL_PG_PORT"
    fi
  fi

  init_cluster
  write_conf
  if [[ -f $LOG ]] && (($(stat -c %s "$LOG") > 20 * 1024 * 1024)); then mv -f "$LOG" "$LOG.1"; fi
  echo "--- $(date -Is) start on $HOST:$PORT" >> "$LOG"
  if ((AS_ROOT)); then chown postgres:postgres "$LOG"; fi
  # -w: pg_ctl waits until the server accepts connections, and notices when it exits early.
  # 9>&-: the server must not inherit (and so hold forever) our lock.
  if ! run_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$START_SECONDS" start > "$DIR/pg_ctl.out" 2>&1 9>&-; then
    cat "$DIR/pg_ctl.out" >&2
    if pid=$(our_pid); then kill -INT "$pid" 2>/dev/null || true; fi
    fail_start "the server did not start on $HOST:$PORT (it exited, or was not ready within $START_SECONDS s)"
  fi
  local deadline=$((SECONDS + 10))
  until pg_answers; do
    ((SECONDS < deadline)) || fail_start "the server started but does not accept connections on $HOST:$PORT"
    sleep 0.2
  done
  pid=$(our_pid) || fail_start "the server on $HOST:$PORT is not the one in $DATA"
  ensure_role || fail_start "could not create the role $APP_USER"
  app_login_ok || fail_start "$APP_USER cannot log in over TCP on $HOST:$PORT"
  if [[ -n ${INFRA_RECORD:-} ]]; then echo postgres >> "$INFRA_RECORD"; fi
  say "started (pid $pid) on $HOST:$PORT; data $DATA; log $LOG; url $(url_for postgres)"
}

stop() {
  local pid
  if ! pid=$(our_pid); then
    if pg_answers; then
      say "not started by this script on $HOST:$PORT; leaving the PostgreSQL there running"
    else
      say "not running on $HOST:$PORT; nothing to stop"
    fi
    return 0
  fi
  local p
  p=$(our_port)
  # SIGINT: fast shutdown; SIGQUIT: immediate shutdown; then SIGKILL.
  local sig
  for sig in INT QUIT KILL; do
    kill -"$sig" "$pid" 2>/dev/null || true
    local wait=5
    [[ $sig == INT ]] && wait=$STOP_SECONDS
    local deadline=$((SECONDS + wait))
    while ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    kill -0 "$pid" 2>/dev/null || break
    say "pid $pid still running after SIG$sig; escalating"
  done
  kill -0 "$pid" 2>/dev/null && die "pid $pid does not exit"
  say "stopped (pid $pid) on $HOST:${p:-$PORT}"
}

status() {
  local pid
  if pid=$(our_pid); then
    local p
    p=$(our_port)
    if [[ $p != "$PORT" ]]; then
      say "our instance (pid $pid) runs on port $p, not $PORT"
      return 3
    elif pg_answers; then
      say "running (pid $pid, started by this script) on $HOST:$PORT; data $DATA"
    else
      say "pid $pid (started by this script) does not accept connections on $HOST:$PORT; see $LOG"
      return 3
    fi
  elif pg_answers; then
    say "$HOST:$PORT accepts connections (a PostgreSQL this script did not start)"
  elif port_open; then
    say "not running; something else (not a PostgreSQL accepting connections) listens on $HOST:$PORT"
    return 3
  else
    say "not running on $HOST:$PORT"
    return 3
  fi
}

createdb() {
  local name=${1:-}
  [[ -n $name ]] || die "usage: $0 createdb NAME"
  valid_db "$name"
  local psql
  psql=$(newest_bin)/psql
  [[ -x $psql ]] || psql=$(command -v psql) || die "psql not found; run $0 start first"
  pg_answers || die "no PostgreSQL accepts connections on $HOST:$PORT; run $0 start first"
  local q=("$psql" -X -qtA -v ON_ERROR_STOP=1 -v db="$name" -d "$(url_for postgres)")
  local owner
  owner=$(PGCONNECT_TIMEOUT=5 "${q[@]}" <<< "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :'db'") \
    || die "cannot query $HOST:$PORT as $APP_USER"
  if [[ -z $owner ]]; then
    # A concurrent createdb may win the race; then the database exists, which is all we want.
    if PGCONNECT_TIMEOUT=5 "${q[@]}" <<< 'CREATE DATABASE :"db";' 2> >(grep -v 'already exists' >&2); then
      say "created database $name (owner $APP_USER): $(url_for "$name")"
      return 0
    fi
    owner=$(PGCONNECT_TIMEOUT=5 "${q[@]}" <<< "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = :'db'") || true
    [[ -n $owner ]] || die "could not create database $name"
  fi
  if [[ $owner != "$APP_USER" ]]; then
    echo "postgres: warning: database $name exists but is owned by $owner, not $APP_USER" >&2
  fi
  say "database $name already exists: $(url_for "$name")"
}

# Serialises start and stop (two `make test` runs starting at once, say).
lock() {
  mkdir -p "$ROOT/.run"
  exec 9> "$ROOT/.run/postgres.lock"
  flock -w 120 9 || die "another $0 start/stop holds $ROOT/.run/postgres.lock"
}

case "${1:-}" in
  start) lock; start ;;
  stop) lock; stop ;;
  status) status ;;
  createdb) createdb "${2:-}" ;;
  url)
    db=${2:-postgres}
    valid_db "$db"
    url_for "$db"
    ;;
  *)
    echo "usage: $0 start|stop|status | createdb NAME | url [DB]   (port: LOCAL_PG_PORT, default 5432)" >&2
    exit 2
    ;;
esac
