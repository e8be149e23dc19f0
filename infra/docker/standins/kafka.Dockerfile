# Stand-in for docker.io/apache/kafka (the version of infra/kafka/pom.xml), for machines that
# cannot pull from a container registry (built by infra/docker/standins/build.sh, whose build
# context holds the jars infra/local/kafka.sh resolves from Maven Central; never pushed).
# Debian's Java 17 runtime and the Kafka jars in /opt/kafka/libs, laid out and started like the
# upstream image for the settings compose.yaml uses: every KAFKA_* variable (other than the JVM
# ones) becomes a broker property (KAFKA_NODE_ID -> node.id; `__` -> `_`, `___` -> `-`),
# CLUSTER_ID formats the storage on first start, and /opt/kafka/bin has kafka-topics.sh,
# kafka-broker-api-versions.sh, kafka-storage.sh, kafka-run-class.sh and kafka-server-start.sh.
# Runs as appuser (uid 1000); data in /var/lib/kafka/data.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --user-group --no-create-home --home-dir /opt/kafka appuser \
 && mkdir -p /var/lib/kafka/data /opt/kafka/config /etc/kafka/docker \
 && chown appuser:appuser /var/lib/kafka/data /opt/kafka/config
COPY libs/ /opt/kafka/libs/
COPY bin/ /opt/kafka/bin/
COPY run /etc/kafka/docker/run
USER appuser
WORKDIR /opt/kafka
EXPOSE 9092
CMD ["/etc/kafka/docker/run"]
