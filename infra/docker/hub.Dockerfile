# The hub image, notification-hub/hub. Built by `make images` (infra/docker/images.sh) with
# podman or docker, from the repository root:
#   docker build -f infra/docker/hub.Dockerfile -t notification-hub/hub:dev .
# Targets:
#   runtime (the default, last)  compiles the hub in rust:1-bookworm and runs it on
#                                debian:bookworm-slim
#   prebuilt                     the same runtime with a hub binary built outside the container
#                                (build argument BIN_DIR, relative to the build context;
#                                images.sh --prebuilt DIR makes a small context for it)
# The process runs as uid/gid 10001 (non-root, numeric so that Kubernetes' runAsNonRoot can
# verify it), listens on 8080 (HUB_ADDR), and needs no writable filesystem.

ARG BASE=debian:bookworm-slim

FROM ${BASE} AS base
# CA certificates: for rediss://, JWKS over https and Kafka over TLS; libssl3: librdkafka's TLS
# (the hub links the system OpenSSL).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 hub \
 && useradd --system --uid 10001 --gid hub --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin hub
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["hub"]
CMD ["serve"]

FROM base AS prebuilt
ARG BIN_DIR=target/release
COPY ${BIN_DIR}/hub /usr/local/bin/hub

FROM rust:1-bookworm AS build
# librdkafka is compiled from source by the rdkafka crate.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY hub hub
COPY producers producers
COPY proto proto
COPY loadtest loadtest
# The hub serves the demo page from these two files (include_str!).
COPY web-demo/index.html web-demo/hub-client.js web-demo/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p hub \
 && install -D target/release/hub /out/hub

FROM base AS runtime
COPY --from=build /out/hub /usr/local/bin/hub
