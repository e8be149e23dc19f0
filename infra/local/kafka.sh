#!/usr/bin/env bash
# Local Apache Kafka (KRaft, one combined broker + controller) for tests and the demo, without
# Docker, systemd or a Kafka download: the jars come from Maven Central (infra/kafka/pom.xml).
#
#   infra/local/kafka.sh start  [--port 9092]  install a JRE / Maven if missing, resolve the jars
#                                              (once), format the storage (once), start our broker
#                                              and wait (up to 60 s) until it lists topics
#   infra/local/kafka.sh stop   [--port 9092]  stop the broker this script started (nothing else)
#   infra/local/kafka.sh status [--port 9092]  one line; exit 0 when a Kafka answers, 3 when not
#   infra/local/kafka.sh topics-create NAME PARTITIONS [--port 9092]
#                                              create a topic (replication 1) unless it exists;
#                                              fails if it exists with another partition count
#   infra/local/kafka.sh topics-list [--port 9092]
#   infra/local/kafka.sh tls-ca                the path of the CA certificate that signs the TLS
#                                              listener's (made when missing)
#   infra/local/kafka.sh run-class CLASS [ARGS...]
#                                              run a Kafka main class on the same classpath (what
#                                              the distribution's kafka-run-class.sh does), e.g.
#                                              org.apache.kafka.tools.ConsoleProducer
#
# A three-broker cluster (three KRaft nodes, each broker + controller, a 3-voter quorum) for the
# tests of replicated Kafka, beside the single broker:
#   infra/local/kafka.sh cluster-start   start the nodes of ours that are not running (all three,
#                                        or one a test killed, with its data) and wait (up to
#                                        90 s) until the metadata lists three brokers
#   infra/local/kafka.sh cluster-stop    stop the nodes this script started (nothing else)
#   infra/local/kafka.sh cluster-status  one line; exit 0 when all three answer, 3 when not
#   infra/local/kafka.sh cluster-brokers the bootstrap list, 127.0.0.1:9192,127.0.0.1:9193,...
#   infra/local/kafka.sh cluster-kill N  SIGKILL node N (1..3), as a crash would
# Node n's clients use port 9192+n-1 and its controller 9195+n-1 (9192-9197; another first
# port with --port or LOCAL_KAFKA_CLUSTER_PORT). Topics default to replication 3 and
# min.insync.replicas 2 (the offsets and transaction topics too); no SASL listener. Config,
# pid files, logs and data are under .run/kafka-cluster/ (node-N.*, data/N/; delete the folder
# to reset). Heap per node: KAFKA_CLUSTER_HEAP_OPTS (default -Xms128m -Xmx384m). INFRA_RECORD
# gets "kafka-cluster" when cluster-start started the whole cluster (infra/local/
# kafka-cluster.sh is this as an infra.sh service).
#
# The port is --port, else LOCAL_KAFKA_PORT, else 9092; the controller listens on the next port
# (LOCAL_KAFKA_CONTROLLER_PORT or --controller-port to change) and a second client listener,
# SASL_PLAINTEXT with SASL/PLAIN, on the one after (LOCAL_KAFKA_SASL_PORT or --sasl-port), and a
# third, SASL_SSL (TLS) with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, on the one after that
# (LOCAL_KAFKA_TLS_PORT or --tls-port). All bind 127.0.0.1 only. The SASL listeners' users are
# fixed local test accounts (the same password for every mechanism):
#   hub / hub-secret          (the hub nodes)
#   services / services-secret (the order, payment, delivery and moderation services)
# The TLS listener's certificate (for 127.0.0.1 and localhost) is signed by a local CA made once
# with openssl under .run/kafka/tls/ (ca.pem is what clients trust: `kafka.sh tls-ca` prints its
# path; delete the folder to make new ones).
# A broker of ours found running without the SASL or TLS listener (started by an older version of
# this script) is restarted by `start`, with its data.
# Our broker keeps its config, pid file, logs and data under .run/kafka/ (git-ignored):
#   classpath.txt            runtime classpath, re-resolved when infra/kafka/pom.xml changes
#   server-PORT.properties   broker config, rewritten at each start
#   kafka-PORT.log           broker log (Log4j 2, rolls at 20 MB); kafka-PORT.out: JVM stdout/stderr
#   data/PORT/               log.dirs (formatted once with a random cluster id; delete it to reset)
# Topics are not auto-created (auto.create.topics.enable=false): create them with topics-create.
# If something already answers the Kafka protocol on the port, `start` reuses it and `stop`
# leaves it alone. When INFRA_RECORD names a file, `start` appends "kafka" to it if it launched a
# new broker, so a caller (infra.sh up --record) can stop only what it started.
# JVM heap: KAFKA_HEAP_OPTS (default -Xms256m -Xmx512m). Java 17 or newer is required; JAVA_HOME
# is honoured.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=infra/local/lib.sh
source "$ROOT/infra/local/lib.sh"
HOST=127.0.0.1
POM=$ROOT/infra/kafka/pom.xml
DIR=$ROOT/.run/kafka
CPFILE=$DIR/classpath.txt
CPKEY=$DIR/classpath.key
RESOLVE_LOG=$DIR/resolve.log
TOOLS_LOG4J=$DIR/tools-log4j2.properties
CLIENT_CONF=$DIR/tools-client.properties
START_SECONDS=${LOCAL_KAFKA_START_TIMEOUT:-60} # bound for start (after the jars are resolved)
STOP_SECONDS=30                              # SIGTERM, then SIGKILL after this

say() { echo "kafka: $*"; }
die() { echo "kafka: $*" >&2; exit 1; }

usage() {
  echo "usage: $0 start|stop|status [--port N] [--sasl-port N] [--tls-port N] | tls-ca | topics-create NAME PARTITIONS [--port N] | topics-list [--port N] | run-class CLASS [ARGS...] | cluster-start|cluster-stop|cluster-status|cluster-brokers [--port N] | cluster-kill NODE [--port N]" >&2
  exit 2
}

cmd=${1:-}
shift || true
PORT=${LOCAL_KAFKA_PORT:-9092}
CPORT=${LOCAL_KAFKA_CONTROLLER_PORT:-}
SPORT=${LOCAL_KAFKA_SASL_PORT:-}
TPORT=${LOCAL_KAFKA_TLS_PORT:-}
port_given=0
args=()
while (($#)); do
  case $1 in
    --port) PORT=${2:?--port needs a number}; port_given=1; shift 2 ;;
    --port=*) PORT=${1#*=}; port_given=1; shift ;;
    --controller-port) CPORT=${2:?--controller-port needs a number}; shift 2 ;;
    --controller-port=*) CPORT=${1#*=}; shift ;;
    --sasl-port) SPORT=${2:?--sasl-port needs a number}; shift 2 ;;
    --sasl-port=*) SPORT=${1#*=}; shift ;;
    --tls-port) TPORT=${2:?--tls-port needs a number}; shift 2 ;;
    --tls-port=*) TPORT=${1#*=}; shift ;;
    *)
      # run-class passes everything after the class name through untouched.
      if [[ $cmd == run-class ]]; then args+=("$@"); break; fi
      args+=("$1"); shift ;;
  esac
done
[[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a number, got '$PORT'"
# The cluster's first client port: --port with a cluster-* command, else LOCAL_KAFKA_CLUSTER_PORT.
CLUSTER_PORT=${LOCAL_KAFKA_CLUSTER_PORT:-9192}
if [[ $cmd == cluster-* ]] && ((port_given)); then CLUSTER_PORT=$PORT; fi
[[ $CLUSTER_PORT =~ ^[0-9]+$ ]] || die "LOCAL_KAFKA_CLUSTER_PORT must be a number, got '$CLUSTER_PORT'"
CPORT=${CPORT:-$((PORT + 1))}
[[ $CPORT =~ ^[0-9]+$ && $CPORT != "$PORT" ]] || die "bad controller port '$CPORT'"
SPORT=${SPORT:-$((PORT + 2))}
[[ $SPORT =~ ^[0-9]+$ && $SPORT != "$PORT" && $SPORT != "$CPORT" ]] || die "bad SASL port '$SPORT'"
TPORT=${TPORT:-$((PORT + 3))}
[[ $TPORT =~ ^[0-9]+$ && $TPORT != "$PORT" && $TPORT != "$CPORT" && $TPORT != "$SPORT" ]] || die "bad TLS port '$TPORT'"

PIDFILE=$DIR/kafka-$PORT.pid
LOG=$DIR/kafka-$PORT.log
OUT=$DIR/kafka-$PORT.out
CONF=$DIR/server-$PORT.properties
LOG4J=$DIR/log4j2-$PORT.properties
DATA=$DIR/data/$PORT
TLS_DIR=$DIR/tls
BOOTSTRAP=$HOST:$PORT
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n 1)

# --- installing what is missing ------------------------------------------------------------

apt_install() {
  command -v apt-get >/dev/null || die "$1 is missing and apt-get is not available; install it and retry"
  local sudo="" rc=0
  if [[ $(id -u) -ne 0 ]]; then sudo=sudo; fi
  say "installing the Debian package(s): $*"
  $sudo apt-get update -qq || rc=$?
  if ((rc == 0)); then
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" || rc=$?
  fi
  ((rc == 0)) || die "apt-get failed (exit $rc) while installing $*"
}

# The major version of the Java runtime $1 ("17"), empty when it cannot tell.
java_major() {
  "$1" -XshowSettings:properties -version 2>&1 \
    | sed -n 's/^ *java\.specification\.version = \([0-9.]*\).*/\1/p' | sed 's/^1\.//; s/\..*//' | head -n 1
}

# Sets JAVA to a Java 17+ runtime, installing openjdk-17-jre-headless when there is no java.
JAVA=""
find_java() {
  [[ -n $JAVA ]] && return 0
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    JAVA=$JAVA_HOME/bin/java
  elif command -v java >/dev/null; then
    JAVA=$(command -v java)
  else
    say "java not found; installing a Java runtime (Kafka 4 needs Java 17+)"
    if apt-cache show openjdk-17-jre-headless >/dev/null 2>&1 || { apt-get update -qq 2>/dev/null; apt-cache show openjdk-17-jre-headless >/dev/null 2>&1; }; then
      apt_install openjdk-17-jre-headless
    else
      apt_install default-jre-headless
    fi
    JAVA=$(command -v java) || die "java still missing after the install"
  fi
  local major
  major=$(java_major "$JAVA")
  if [[ -z $major ]] || ((major < 17)); then
    die "Kafka $KAFKA_VERSION needs Java 17 or newer; $JAVA is ${major:-of unknown version} (set JAVA_HOME)"
  fi
}

ensure_maven() {
  command -v mvn >/dev/null && return 0
  say "mvn not found; installing Maven to resolve the Kafka jars from Maven Central"
  apt_install maven
  command -v mvn >/dev/null || die "mvn still missing after installing maven"
}

# --- the classpath (resolved once, again when pom.xml changes) --------------------------------

CP=""
classpath_complete() {
  local f IFS=:
  for f in $(<"$CPFILE"); do [[ -f $f ]] || return 1; done
}

resolve_classpath() {
  [[ -n $CP ]] && return 0
  mkdir -p "$DIR"
  local key
  key=$(sha256sum "$POM" | cut -d' ' -f1)
  if [[ -s $CPFILE && -f $CPKEY && $(<"$CPKEY") == "$key" ]] && classpath_complete; then
    CP=$(<"$CPFILE")
    return 0
  fi
  find_java
  ensure_maven
  say "resolving Kafka $KAFKA_VERSION jars from Maven Central into the local Maven repository (the first run downloads ~45 MB; log $RESOLVE_LOG)"
  local tmp=$CPFILE.tmp t0=$SECONDS
  rm -f "$tmp"
  if ! JAVA_HOME=${JAVA_HOME:-$(dirname "$(dirname "$(readlink -f "$JAVA")")")} \
      mvn -B -f "$POM" validate -Dkafka.classpath.file="$tmp" > "$RESOLVE_LOG" 2>&1 || [[ ! -s $tmp ]]; then
    tail -n 30 "$RESOLVE_LOG" >&2
    die "resolving the Kafka jars with Maven failed; full log: $RESOLVE_LOG"
  fi
  mv -f "$tmp" "$CPFILE"
  echo "$key" > "$CPKEY"
  CP=$(<"$CPFILE")
  say "resolved $(tr ':' '\n' < "$CPFILE" | wc -l) jars in $((SECONDS - t0)) s -> $CPFILE"
}

# --- running Kafka classes -------------------------------------------------------------------

write_tools_config() {
  mkdir -p "$DIR"
  cat > "$TOOLS_LOG4J" <<'EOF'
# Log4j 2 config for the command-line tools (topics-create, run-class): warnings to stderr.
status = error
appender.err.type = Console
appender.err.name = stderr
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.err.ref = stderr
EOF
  cat > "$CLIENT_CONF" <<'EOF'
# Admin client settings for the readiness check and topics-*: fail fast instead of the
# default 60 s when the broker is not (yet) there.
request.timeout.ms=5000
default.api.timeout.ms=10000
EOF
}

# Runs a Kafka main class ($1) with its arguments, on our classpath, with a small heap;
# killed after TOOL_TIMEOUT seconds when that is set.
run_tool() {
  # Messages about installing or resolving go to stderr: stdout is the tool's own.
  find_java >&2
  resolve_classpath >&2
  [[ -f $TOOLS_LOG4J && -f $CLIENT_CONF ]] || write_tools_config
  local cls=$1 limit=()
  shift
  if [[ -n ${TOOL_TIMEOUT:-} ]]; then limit=(timeout "$TOOL_TIMEOUT"); fi
  "${limit[@]}" "$JAVA" -Xms32m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$CP" "$cls" "$@"
}

# --- probes ----------------------------------------------------------------------------------

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

# True when the port answers a Kafka ApiVersions request (v0, correlation id 42) with the same
# correlation id and error code NONE (0) or UNSUPPORTED_VERSION (35): that is a Kafka broker.
# Pure bash, no JVM: fast enough for status and for the wait loop.
speaks_kafka() {
  local hex
  hex=$(timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$1 || exit 1
    printf '\x00\x00\x00\x0a\x00\x12\x00\x00\x00\x00\x00\x2a\xff\xff' >&3
    head -c 10 <&3" 2>/dev/null | od -An -tx1 | tr -d ' \n') || true
  [[ ${hex:8:8} == 0000002a && (${hex:16:4} == 0000 || ${hex:16:4} == 0023) ]]
}

# True when the SASL listener speaks Kafka and the TLS listener accepts connections (a broker
# started by an older kafka.sh has neither).
listeners_up() { speaks_kafka "$SPORT" && port_open "$TPORT"; }

# True when the broker serves metadata: the topic list comes back (one short-lived JVM).
lists_topics() {
  TOOL_TIMEOUT=25 run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" \
    --command-config "$CLIENT_CONF" --list > /dev/null 2>&1
}

# The pid of the broker this script started on this port, when it still runs.
our_pid() {
  [[ -f $PIDFILE ]] || return 1
  local pid
  pid=$(tr -dc '0-9' < "$PIDFILE")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a reused pid: it must still be our kafka.Kafka with our config.
  tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -qF -- "kafka.Kafka $CONF" || return 1
  echo "$pid"
}

show_log_tail() {
  if [[ -s $LOG ]]; then
    echo "kafka: last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
  fi
  if [[ -s $OUT ]]; then
    echo "kafka: last lines of $OUT:" >&2
    tail -n 15 "$OUT" >&2
  fi
}

# Waits until our broker (pid $1) answers ApiVersions and lists topics, at most until $2 (SECONDS).
wait_ready() {
  local pid=$1 deadline=$2
  while ((SECONDS < deadline)); do
    kill -0 "$pid" 2>/dev/null || { echo "kafka: the broker (pid $pid) exited during start" >&2; return 1; }
    if speaks_kafka "$PORT" && listeners_up && lists_topics; then return 0; fi
    sleep 0.5
  done
  echo "kafka: not ready on $BOOTSTRAP after $START_SECONDS s" >&2
  return 1
}

# --- config and storage ----------------------------------------------------------------------

# write_log4j FILE LOG: a Log4j 2 config in FILE that sends the broker's log to LOG.
write_log4j() {
  cat > "$1" <<EOF
# Written by infra/local/kafka.sh: the broker logs to $2 (rolls at 20 MB, keeps 3).
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $2
appender.file.filePattern = $2.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.request.additivity = false
logger.request.appenderRef.file.ref = file
EOF
}

write_broker_config() {
  mkdir -p "$DIR" "$DATA"
  cat > "$CONF" <<EOF
# Written by infra/local/kafka.sh at each start; edit the script, not this file.
# One combined KRaft broker + controller for local tests and the demo.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CPORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CPORT,SASL_PLAINTEXT://$HOST:$SPORT,SASL_SSL://$HOST:$TPORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,SASL_PLAINTEXT://$HOST:$SPORT,SASL_SSL://$HOST:$TPORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER

# The SASL listener: SASL/PLAIN with fixed local test users (no authorizer: any authenticated
# user may do anything, as on the PLAINTEXT listener). For local tests and the demo only.
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_hub="hub-secret" user_services="services-secret";

# The TLS listener: SASL over TLS with PLAIN and SCRAM (the SCRAM users are added after each
# start, kafka.sh add_scram_users); the key and certificate chain in one PEM file, made by
# kafka.sh with a local CA.
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_hub="hub-secret" user_services="services-secret";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$TLS_DIR/broker-keystore.pem
log.dirs=$DATA

# Topics are created explicitly (kafka.sh topics-create), never by a producer's typo.
auto.create.topics.enable=false
num.partitions=3
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Consumer groups start consuming at once (tests).
group.initial.rebalance.delay.ms=0

log.retention.hours=24
log.segment.bytes=67108864
num.network.threads=2
num.io.threads=4
EOF
  write_log4j "$LOG4J" "$LOG"
}

# Makes the local CA and the broker's key and certificate (127.0.0.1, localhost) under TLS_DIR
# once; a half-made set (an interrupted run) is made again. Locked: private brokers on other
# ports share the files.
ensure_tls() {
  mkdir -p "$TLS_DIR"
  (
    flock -w 60 8 || die "another kafka.sh holds $TLS_DIR/.lock"
    [[ -s $TLS_DIR/ca.pem && -s $TLS_DIR/broker-keystore.pem ]] && exit 0
    command -v openssl >/dev/null || apt_install openssl
    local tmp
    tmp=$(mktemp -d "$TLS_DIR/.new.XXXXXX")
    # shellcheck disable=SC2064 # the path is fixed now
    trap "rm -rf '$tmp'" EXIT
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=notification-hub local Kafka CA" \
      -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null || die "openssl could not make the local CA"
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$tmp/broker.key" -out "$tmp/broker.csr" 2>/dev/null || die "openssl could not make the broker key"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > "$tmp/ext"
    openssl x509 -req -in "$tmp/broker.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
      -days 3650 -extfile "$tmp/ext" -out "$tmp/broker.pem" 2>/dev/null || die "openssl could not sign the broker certificate"
    # Kafka's PEM key store: the unencrypted PKCS#8 key, then the certificate chain.
    openssl pkcs8 -topk8 -nocrypt -in "$tmp/broker.key" -out "$tmp/broker.pk8" || die "openssl could not convert the broker key"
    cat "$tmp/broker.pk8" "$tmp/broker.pem" "$tmp/ca.pem" > "$tmp/broker-keystore.pem"
    chmod 600 "$tmp/ca.key" "$tmp/broker-keystore.pem"
    mv -f "$tmp/ca.key" "$TLS_DIR/ca.key"
    mv -f "$tmp/broker-keystore.pem" "$TLS_DIR/broker-keystore.pem"
    mv -f "$tmp/ca.pem" "$TLS_DIR/ca.pem"
    echo "kafka: made a local CA and the TLS listener's certificate in $TLS_DIR"
  ) 8> "$DIR/.lock-tls"
}

# Gives the local test users their SCRAM-SHA-256 and SCRAM-SHA-512 credentials (idempotent; the
# storage keeps them, a restarted broker needs nothing).
add_scram_users() {
  local user mechanism
  # One mechanism per request: the brokers refuse two credentials of a user in one.
  for user in hub services; do
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
      TOOL_TIMEOUT=40 run_tool org.apache.kafka.tools.ConfigCommand --bootstrap-server "$BOOTSTRAP" \
        --command-config "$CLIENT_CONF" --alter --entity-type users --entity-name "$user" \
        --add-config "$mechanism=[password=$user-secret]" > /dev/null 2>> "$OUT" || return 1
    done
  done
}

format_storage() {
  [[ -f $DATA/meta.properties ]] && return 0
  local id
  id=$(run_tool kafka.tools.StorageTool random-uuid 2>>"$OUT" | tail -n 1)
  [[ -n $id ]] || { show_log_tail; die "could not generate a cluster id"; }
  say "formatting the KRaft storage in $DATA (cluster id $id)"
  if ! run_tool kafka.tools.StorageTool format -t "$id" -c "$CONF" --ignore-formatted >> "$OUT" 2>&1; then
    tail -n 20 "$OUT" >&2
    die "formatting the storage failed; see $OUT"
  fi
}

# launch_broker DIR PIDFILE OUT LOG4J CONF HEAP: starts kafka.Kafka CONF in the background, in
# DIR, appending its stdout/stderr to OUT. The pid file gets the pid of the bash that then execs
# java (setsid: its own session, so a Ctrl-C in the caller's terminal does not reach the broker;
# fd 9, the lock, is not inherited).
launch_broker() {
  local dir=$1 pidfile=$2 out=$3 log4j=$4 conf=$5 heap=$6
  # shellcheck disable=SC2016,SC2086 # $$ is the inner bash's; $heap is a list of options
  (
    cd "$dir"
    exec setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidfile" \
      "$JAVA" $heap \
      -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
      -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$log4j" -Dkafka.logs.dir="$dir" \
      -cp "$CP" kafka.Kafka "$conf"
  ) < /dev/null >> "$out" 2>&1 9>&- &
}

# --- commands --------------------------------------------------------------------------------

lock() {
  mkdir -p "$DIR"
  exec 9> "$DIR/.lock-$PORT"
  flock -w 120 9 || die "another kafka.sh holds $DIR/.lock-$PORT"
}

start() {
  lock
  local pid
  if pid=$(our_pid); then
    # Ours runs: a no-op once it answers (it may still be starting).
    if ! speaks_kafka "$PORT"; then
      wait_ready "$pid" $((SECONDS + START_SECONDS)) || { show_log_tail; die "our broker (pid $pid) does not answer on $BOOTSTRAP"; }
    fi
    if listeners_up; then
      say "already running (pid $pid) on $BOOTSTRAP (SASL on $HOST:$SPORT, SASL over TLS on $HOST:$TPORT)"
      return 0
    fi
    # Started by an older version of this script, before the SASL or TLS listener existed.
    say "our broker (pid $pid) has no SASL listener on $HOST:$SPORT or no TLS listener on $HOST:$TPORT (started by an older kafka.sh); restarting it with its data"
    terminate "$pid" "$STOP_SECONDS" || say "pid $pid still running after $STOP_SECONDS s; killed it (SIGKILL)"
    rm -f "$PIDFILE"
  fi
  rm -f "$PIDFILE" # stale
  if port_open "$PORT"; then
    if speaks_kafka "$PORT"; then
      say "$BOOTSTRAP already answers as a Kafka broker this script did not start; reusing it"
      speaks_kafka "$SPORT" || say "note: it has no SASL listener on $HOST:$SPORT (tests and DEMO_KAFKA_SASL=1 that need one use their own broker, or stop that one)"
      return 0
    fi
    die "something on $BOOTSTRAP is not a Kafka broker; free the port or use --port / LOCAL_KAFKA_PORT"
  fi
  port_open "$CPORT" && die "controller port $HOST:$CPORT is in use; free it or set --controller-port"
  port_open "$SPORT" && die "SASL port $HOST:$SPORT is in use; free it or set --sasl-port / LOCAL_KAFKA_SASL_PORT"
  port_open "$TPORT" && die "TLS port $HOST:$TPORT is in use; free it or set --tls-port / LOCAL_KAFKA_TLS_PORT"

  find_java
  resolve_classpath
  write_tools_config
  ensure_tls
  write_broker_config
  format_storage

  local t0=$SECONDS
  echo "--- $(date -Is) start Kafka $KAFKA_VERSION on $BOOTSTRAP (controller $CPORT)" >> "$OUT"
  launch_broker "$DIR" "$PIDFILE" "$OUT" "$LOG4J" "$CONF" "${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
  local deadline=$((SECONDS + START_SECONDS)) launched
  while ! pid=$(our_pid); do
    launched=$(tr -dc '0-9' 2>/dev/null < "$PIDFILE" || true)
    if [[ -n $launched ]] && ! kill -0 "$launched" 2>/dev/null; then
      show_log_tail; rm -f "$PIDFILE"; die "the broker JVM (pid $launched) exited at once"
    fi
    if ((SECONDS >= deadline)); then show_log_tail; die "the broker process did not come up"; fi
    sleep 0.1
  done
  if wait_ready "$pid" "$deadline" && { add_scram_users || { echo "kafka: could not add the SCRAM users; see $OUT" >&2; false; }; }; then
    say "started Kafka $KAFKA_VERSION (pid $pid) on $BOOTSTRAP, SASL_PLAINTEXT on $HOST:$SPORT, SASL_SSL on $HOST:$TPORT, controller $HOST:$CPORT, in $((SECONDS - t0)) s; log $LOG"
    if [[ -n ${INFRA_RECORD:-} ]]; then echo kafka >> "$INFRA_RECORD"; fi
    return 0
  fi
  show_log_tail
  if pid=$(our_pid); then kill -TERM "$pid" 2>/dev/null || true; fi
  exit 1
}

stop() {
  lock
  local pid
  if ! pid=$(our_pid); then
    rm -f "$PIDFILE"
    if speaks_kafka "$PORT"; then
      say "not started by this script on $BOOTSTRAP; leaving the Kafka there running"
    else
      say "not running on $BOOTSTRAP; nothing to stop"
    fi
    return 0
  fi
  terminate "$pid" "$STOP_SECONDS" || say "pid $pid still running after $STOP_SECONDS s; killed it (SIGKILL)"
  rm -f "$PIDFILE"
  say "stopped (pid $pid) on $BOOTSTRAP"
}

status() {
  local pid
  if pid=$(our_pid); then
    if speaks_kafka "$PORT" && ! listeners_up; then
      say "running (pid $pid, started by this script) on $BOOTSTRAP but without the SASL listener on $HOST:$SPORT or the TLS listener on $HOST:$TPORT (an older kafka.sh started it): run kafka.sh start to restart it"
      return 3
    elif speaks_kafka "$PORT"; then
      say "running (pid $pid, started by this script, Kafka $KAFKA_VERSION) on $BOOTSTRAP, SASL_PLAINTEXT on $HOST:$SPORT, SASL_SSL on $HOST:$TPORT, controller $HOST:$CPORT"
    else
      say "pid $pid (started by this script) does not answer on $BOOTSTRAP (starting, or stuck: see $LOG)"
      return 3
    fi
  elif speaks_kafka "$PORT"; then
    say "$BOOTSTRAP answers as a Kafka broker (one this script did not start$(speaks_kafka "$SPORT" || echo "; no SASL listener on $HOST:$SPORT"))"
  elif port_open "$PORT"; then
    say "not running on $BOOTSTRAP (the port is taken by something that is not Kafka)"
    return 3
  else
    say "not running on $BOOTSTRAP"
    return 3
  fi
}

topics_create() {
  ((${#args[@]} == 2)) || usage
  local name=${args[0]} parts=${args[1]}
  [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "bad topic name '$name'"
  [[ $parts =~ ^[1-9][0-9]*$ ]] || die "PARTITIONS must be a positive number, got '$parts'"
  run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" --command-config "$CLIENT_CONF" \
    --create --if-not-exists --topic "$name" --partitions "$parts" --replication-factor 1 >/dev/null \
    || die "could not create topic '$name' on $BOOTSTRAP (is the broker up? kafka.sh status)"
  local have
  have=$(run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" --command-config "$CLIENT_CONF" \
    --describe --topic "$name" | sed -n 's/.*PartitionCount: *\([0-9]*\).*/\1/p' | head -n 1)
  [[ -n $have ]] || die "topic '$name' not found after creating it on $BOOTSTRAP"
  [[ $have == "$parts" ]] || die "topic '$name' already exists on $BOOTSTRAP with $have partitions, not $parts"
  say "topic $name ready on $BOOTSTRAP ($have partitions, replication 1)"
}

topics_list() {
  ((${#args[@]} == 0)) || usage
  run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" --command-config "$CLIENT_CONF" --list
}

run_class() {
  ((${#args[@]} >= 1)) || usage
  run_tool "${args[@]}"
}

# --- the three-broker cluster ------------------------------------------------------------------
# Three combined KRaft broker + controller nodes (a 3-voter controller quorum) on 127.0.0.1:
# node n (1..3) takes client port CLUSTER_PORT+n-1 and controller port CLUSTER_PORT+3+n-1.
# Topics default to replication 3 with min.insync.replicas 2, as in production: a write
# acknowledged by `acks=all` is on two brokers at least, and one broker may be lost.

CLUSTER_DIR=$ROOT/.run/kafka-cluster
CLUSTER_NODES=3
CLUSTER_SECONDS=${LOCAL_KAFKA_START_TIMEOUT:-90} # three JVMs starting at once on a small machine

cnode_port() { echo $((CLUSTER_PORT + $1 - 1)); }
cnode_cport() { echo $((CLUSTER_PORT + CLUSTER_NODES + $1 - 1)); }
cnode_conf() { echo "$CLUSTER_DIR/node-$1.properties"; }

cluster_brokers() {
  local n out=()
  for ((n = 1; n <= CLUSTER_NODES; n++)); do out+=("$HOST:$(cnode_port "$n")"); done
  (IFS=,; echo "${out[*]}")
}

cluster_range() { echo "$HOST:$(cnode_port 1)-$(cnode_port "$CLUSTER_NODES")"; }

# The pid of our node $1 when it still runs (guarded against a reused pid like our_pid).
cnode_pid() {
  local pidfile=$CLUSTER_DIR/node-$1.pid pid
  [[ -f $pidfile ]] || return 1
  pid=$(tr -dc '0-9' < "$pidfile")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -qF -- "kafka.Kafka $(cnode_conf "$1")" || return 1
  echo "$pid"
}

# How many brokers the cluster's metadata lists as alive (fenced ones are not listed).
cluster_broker_count() {
  TOOL_TIMEOUT=25 run_tool org.apache.kafka.tools.BrokerApiVersionsCommand \
    --bootstrap-server "$(cluster_brokers)" --command-config "$CLIENT_CONF" 2>/dev/null \
    | grep -c '(id: [0-9]* rack' || true
}

# Every node answers ApiVersions and the metadata lists all three brokers.
cluster_ready() {
  local n
  for ((n = 1; n <= CLUSTER_NODES; n++)); do speaks_kafka "$(cnode_port "$n")" || return 1; done
  [[ $(cluster_broker_count) == "$CLUSTER_NODES" ]]
}

write_cluster_config() {
  local n=$1 voters="" i
  for ((i = 1; i <= CLUSTER_NODES; i++)); do voters+="${voters:+,}$i@$HOST:$(cnode_cport "$i")"; done
  mkdir -p "$CLUSTER_DIR/data/$n"
  cat > "$(cnode_conf "$n")" <<CONF
# Written by infra/local/kafka.sh at each cluster start; edit the script, not this file.
# Node $n of the local three-broker cluster: a combined KRaft broker + controller.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://$HOST:$(cnode_port "$n"),CONTROLLER://$HOST:$(cnode_cport "$n")
advertised.listeners=PLAINTEXT://$HOST:$(cnode_port "$n")
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$CLUSTER_DIR/data/$n

# Replicated as in production: three copies, two in sync for an acks=all write, never an
# out-of-sync replica elected leader.
auto.create.topics.enable=false
num.partitions=6
default.replication.factor=3
min.insync.replicas=2
unclean.leader.election.enable=false
offsets.topic.replication.factor=3
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
# A broker that stops heart-beating is fenced after 4 s (default 9 s): its partitions get new
# leaders and it leaves the ISRs sooner, which keeps failover tests short.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000

log.retention.hours=24
log.segment.bytes=67108864
num.network.threads=2
num.io.threads=2
CONF
  write_log4j "$CLUSTER_DIR/log4j2-node-$n.properties" "$CLUSTER_DIR/node-$n.log"
}

# Formats each node's storage once, all with the same cluster id.
format_cluster() {
  local n id idfile=$CLUSTER_DIR/cluster.id out
  if [[ ! -s $idfile ]]; then
    id=$(run_tool kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    [[ -n $id ]] || die "could not generate a cluster id"
    echo "$id" > "$idfile"
  fi
  id=$(<"$idfile")
  for ((n = 1; n <= CLUSTER_NODES; n++)); do
    [[ -f $CLUSTER_DIR/data/$n/meta.properties ]] && continue
    out=$CLUSTER_DIR/node-$n.out
    say "formatting the KRaft storage of cluster node $n (cluster id $id)"
    if ! run_tool kafka.tools.StorageTool format -t "$id" -c "$(cnode_conf "$n")" --ignore-formatted >> "$out" 2>&1; then
      tail -n 20 "$out" >&2
      die "formatting the storage of cluster node $n failed; see $out"
    fi
  done
}

cluster_log_tail() {
  local n
  for ((n = 1; n <= CLUSTER_NODES; n++)); do
    if [[ -s $CLUSTER_DIR/node-$n.log ]]; then
      echo "kafka: last lines of $CLUSTER_DIR/node-$n.log:" >&2
      tail -n 10 "$CLUSTER_DIR/node-$n.log" >&2
    fi
  done
}

cluster_lock() {
  mkdir -p "$CLUSTER_DIR"
  exec 9> "$CLUSTER_DIR/.lock"
  flock -w 120 9 || die "another kafka.sh holds $CLUSTER_DIR/.lock"
}

# Starts every node of ours that is not running (all three, or one a test killed) and waits
# until the metadata lists three brokers.
cluster_start() {
  cluster_lock
  local n port running=0 foreign=0 launched=()
  for ((n = 1; n <= CLUSTER_NODES; n++)); do
    port=$(cnode_port "$n")
    if cnode_pid "$n" >/dev/null; then
      running=$((running + 1))
    elif port_open "$port"; then
      speaks_kafka "$port" || die "something on $HOST:$port is not a Kafka broker; free $(cluster_range) or set LOCAL_KAFKA_CLUSTER_PORT"
      foreign=$((foreign + 1))
    elif port_open "$(cnode_cport "$n")"; then
      die "controller port $HOST:$(cnode_cport "$n") is in use; free it or set LOCAL_KAFKA_CLUSTER_PORT"
    fi
  done
  if ((foreign == CLUSTER_NODES)); then
    say "$(cluster_brokers) already answer as Kafka brokers this script did not start; reusing them"
    return 0
  fi
  ((foreign == 0)) || die "some of $(cluster_range) answer as Kafka brokers this script did not start; free the ports or set LOCAL_KAFKA_CLUSTER_PORT"

  find_java
  resolve_classpath
  write_tools_config
  if ((running == CLUSTER_NODES)); then
    local deadline=$((SECONDS + CLUSTER_SECONDS))
    until cluster_ready; do
      ((SECONDS < deadline)) || { cluster_log_tail; die "our cluster nodes run but $(cluster_brokers) is not ready after $CLUSTER_SECONDS s"; }
      sleep 0.5
    done
    say "cluster already running on $(cluster_brokers)"
    return 0
  fi
  for ((n = 1; n <= CLUSTER_NODES; n++)); do write_cluster_config "$n"; done
  format_cluster

  local t0=$SECONDS pid
  for ((n = 1; n <= CLUSTER_NODES; n++)); do
    cnode_pid "$n" >/dev/null && continue
    rm -f "$CLUSTER_DIR/node-$n.pid"
    echo "--- $(date -Is) start Kafka $KAFKA_VERSION cluster node $n on $HOST:$(cnode_port "$n")" >> "$CLUSTER_DIR/node-$n.out"
    launch_broker "$CLUSTER_DIR" "$CLUSTER_DIR/node-$n.pid" "$CLUSTER_DIR/node-$n.out" \
      "$CLUSTER_DIR/log4j2-node-$n.properties" "$(cnode_conf "$n")" \
      "${KAFKA_CLUSTER_HEAP_OPTS:--Xms128m -Xmx384m}"
    launched+=("$n")
  done
  local deadline=$((SECONDS + CLUSTER_SECONDS)) pidfile
  for n in "${launched[@]}"; do
    pidfile=$CLUSTER_DIR/node-$n.pid
    while ! cnode_pid "$n" >/dev/null; do
      pid=$(tr -dc '0-9' 2>/dev/null < "$pidfile" || true)
      if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
        cluster_log_tail; tail -n 15 "$CLUSTER_DIR/node-$n.out" >&2
        die "cluster node $n (pid $pid) exited at once; see $CLUSTER_DIR/node-$n.out"
      fi
      ((SECONDS < deadline)) || { cluster_log_tail; die "cluster node $n did not come up"; }
      sleep 0.1
    done
  done
  until cluster_ready; do
    for n in "${launched[@]}"; do
      cnode_pid "$n" >/dev/null || { cluster_log_tail; die "cluster node $n exited during start; see $CLUSTER_DIR/node-$n.log"; }
    done
    if ((SECONDS >= deadline)); then
      cluster_log_tail
      die "the cluster on $(cluster_brokers) does not list $CLUSTER_NODES brokers after $CLUSTER_SECONDS s"
    fi
    sleep 0.5
  done
  say "started cluster node(s) ${launched[*]} of Kafka $KAFKA_VERSION in $((SECONDS - t0)) s: brokers $(cluster_brokers), controllers $HOST:$(cnode_cport 1)-$(cnode_cport "$CLUSTER_NODES"); logs in $CLUSTER_DIR"
  # Recorded only when this run started the cluster, not when it restarted one node of it.
  if ((running == 0)) && [[ -n ${INFRA_RECORD:-} ]]; then echo kafka-cluster >> "$INFRA_RECORD"; fi
}

cluster_stop() {
  cluster_lock
  local n pid pids=() stopped=()
  # All at once: a node stopping alone waits for the others' controlled shutdown.
  for ((n = 1; n <= CLUSTER_NODES; n++)); do
    if pid=$(cnode_pid "$n"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); stopped+=("$n")
    fi
    rm -f "$CLUSTER_DIR/node-$n.pid"
  done
  if ((${#pids[@]} == 0)); then
    say "no cluster node started by this script runs on $(cluster_range); nothing to stop"
    return 0
  fi
  for pid in "${pids[@]}"; do
    terminate "$pid" "$STOP_SECONDS" || say "pid $pid still running after $STOP_SECONDS s; killed it (SIGKILL)"
  done
  say "stopped cluster node(s) ${stopped[*]} on $(cluster_range)"
}

cluster_status() {
  local n up=0 ours=0
  for ((n = 1; n <= CLUSTER_NODES; n++)); do
    speaks_kafka "$(cnode_port "$n")" && up=$((up + 1))
    cnode_pid "$n" >/dev/null && ours=$((ours + 1))
  done
  if ((up == CLUSTER_NODES)); then
    say "cluster running on $(cluster_brokers) ($ours of $CLUSTER_NODES nodes started by this script)"
  else
    say "cluster not running on $(cluster_range): $up of $CLUSTER_NODES brokers answer"
    return 3
  fi
}

# SIGKILL to our node $1, as a crash would; `cluster-start` brings it back with its data.
cluster_kill() {
  ((${#args[@]} == 1)) || usage
  local n=${args[0]} pid
  if [[ ! $n =~ ^[1-9]$ ]] || ((n > CLUSTER_NODES)); then die "NODE must be 1..$CLUSTER_NODES, got '$n'"; fi
  pid=$(cnode_pid "$n") || die "cluster node $n is not running (or not started by this script)"
  kill -KILL "$pid"
  local deadline=$((SECONDS + 10))
  while kill -0 "$pid" 2>/dev/null; do
    ((SECONDS < deadline)) || die "cluster node $n (pid $pid) survived SIGKILL for 10 s"
    sleep 0.05
  done
  rm -f "$CLUSTER_DIR/node-$n.pid"
  say "killed cluster node $n (pid $pid, SIGKILL) on $HOST:$(cnode_port "$n")"
}

case $cmd in
  start) ((${#args[@]} == 0)) || usage; start ;;
  stop) ((${#args[@]} == 0)) || usage; stop ;;
  status) ((${#args[@]} == 0)) || usage; status ;;
  topics-create) topics_create ;;
  topics-list) topics_list ;;
  run-class) run_class ;;
  tls-ca) ((${#args[@]} == 0)) || usage; ensure_tls >&2; echo "$TLS_DIR/ca.pem" ;;
  cluster-start) ((${#args[@]} == 0)) || usage; cluster_start ;;
  cluster-stop) ((${#args[@]} == 0)) || usage; cluster_stop ;;
  cluster-status) ((${#args[@]} == 0)) || usage; cluster_status ;;
  cluster-brokers) ((${#args[@]} == 0)) || usage; cluster_brokers ;;
  cluster-kill) cluster_kill ;;
  *) usage ;;
esac
