# Stand-in for docker.io/prom/prometheus, for machines that cannot pull from a container
# registry (built by infra/docker/standins/build.sh; never pushed). Debian bookworm's prometheus
# (2.42; the tag compose.yaml names is newer) and promtool, laid out like the upstream image:
# entrypoint /bin/prometheus, default arguments --config.file=/etc/prometheus/prometheus.yml
# --storage.tsdb.path=/prometheus, working directory /prometheus, user nobody; wget for health
# checks, as upstream's busybox has.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && { [ -e /bin/prometheus ] || ln -s /usr/bin/prometheus /bin/prometheus; } \
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
