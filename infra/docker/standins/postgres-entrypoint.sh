#!/bin/bash
# The upstream image's first-start behaviour, for the settings compose.yaml uses (see
# postgres.Dockerfile). Sockets go to /tmp: /run may be an empty tmpfs in a container.
set -euo pipefail
if [[ ${1:-} == -* ]]; then set -- postgres "$@"; fi
if [[ ${1:-} != postgres ]]; then exec "$@"; fi
shift

if [[ ! -s $PGDATA/PG_VERSION ]]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set (the superuser password for TCP clients)}"
  user=${POSTGRES_USER:-postgres}
  db=${POSTGRES_DB:-$user}
  pw=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pw"
  initdb -D "$PGDATA" --username="$user" --pwfile="$pw" --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 > /dev/null
  rm -f "$pw"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  # A server on the socket only while the init scripts run: nobody can connect over TCP yet,
  # so a TCP health check (pg_isready -h 127.0.0.1) passes only once the database is complete.
  pg_ctl -D "$PGDATA" -w -s -o "-c listen_addresses='' -c unix_socket_directories=/tmp" start
  psql=(psql -X -q -v ON_ERROR_STOP=1 -h /tmp -U "$user")
  if [[ $db != postgres ]]; then
    "${psql[@]}" -d postgres -c "CREATE DATABASE \"$db\"" > /dev/null
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case $f in
      *.sql) echo "postgres: running $f"; "${psql[@]}" -d "$db" -f "$f" ;;
      *.sh) echo "postgres: running $f"; PGHOST=/tmp PGUSER=$user PGDATABASE=$db bash "$f" ;;
    esac
  done
  pg_ctl -D "$PGDATA" -w -s -m fast stop
  echo "postgres: initialised $PGDATA (user $user, database $db)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
