#!/bin/sh
# As the upstream image's entrypoint: options alone mean redis-server with those options. A
# server without a config file binds every address; protected mode (which refuses clients from
# other addresses when there is no password) is off, as upstream builds it, since the container
# network is the boundary.
set -e
case ${1:-} in
  -* | *.conf) set -- redis-server "$@" ;;
esac
if [ "${1:-}" = redis-server ]; then
  shift
  case ${1:-} in
    *.conf) conf=$1; shift; set -- redis-server "$conf" --protected-mode no "$@" ;;
    *) set -- redis-server --protected-mode no "$@" ;;
  esac
fi
exec "$@"
