# Stand-in for docker.io/library/postgres:16, for machines that cannot pull from a container
# registry (built by infra/docker/standins/build.sh; never pushed). Debian bookworm's
# PostgreSQL (15: the major version differs from the tag; the services need nothing newer),
# started like the upstream image for the settings infra/compose/compose.yaml uses:
# POSTGRES_PASSWORD (required), POSTGRES_USER (default postgres), POSTGRES_DB (default the
# user), /docker-entrypoint-initdb.d/*.sql and *.sh run once on an empty PGDATA, then
# `postgres [ARGS...]` (the default command) listening on every address, password
# (scram-sha-256) for TCP clients. Runs as the user postgres.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# The package must not create (or start) its own `main` cluster: the entrypoint makes one in PGDATA.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/no-main.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)" /usr/lib/postgresql/bin \
 && mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d \
 && chown postgres:postgres /var/lib/postgresql/data && chmod 700 /var/lib/postgresql/data
ENV PATH=/usr/lib/postgresql/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
