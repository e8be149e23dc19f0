# Stand-in for docker.io/library/redis:7, for machines that cannot pull from a container registry
# (built by infra/docker/standins/build.sh; never pushed). Debian bookworm's redis-server 7.0,
# started like the upstream image: `redis-server [ARGS...]` (the default command), listening on
# every address of the container with protected mode off, working directory /data, as the
# unprivileged user redis.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
