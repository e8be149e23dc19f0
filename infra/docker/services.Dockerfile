# The producer services' image, notification-hub/services: order-service, payment-service,
# delivery-service and moderation-service on the PATH; the command picks one:
#   docker run notification-hub/services:dev payment-service
# Built by `make images` (infra/docker/images.sh), from the repository root:
#   docker build -f infra/docker/services.Dockerfile -t notification-hub/services:dev .
# Targets as in hub.Dockerfile: runtime (the default: compiled in rust:1-bookworm, run on
# debian:bookworm-slim) and prebuilt (binaries from BIN_DIR in the build context). Runs as
# uid/gid 10001; needs no writable filesystem.

ARG BASE=debian:bookworm-slim

FROM ${BASE} AS base
# CA certificates: for TLS to PostgreSQL and Kafka; libssl3: librdkafka's TLS (the services link
# the system OpenSSL).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 hub \
 && useradd --system --uid 10001 --gid hub --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin hub
USER 10001:10001
EXPOSE 8081 8083 8084 8085
CMD ["order-service"]

FROM base AS prebuilt
ARG BIN_DIR=target/release
COPY ${BIN_DIR}/order-service ${BIN_DIR}/payment-service ${BIN_DIR}/delivery-service \
     ${BIN_DIR}/moderation-service /usr/local/bin/

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY hub hub
COPY producers producers
COPY proto proto
COPY loadtest loadtest
COPY web-demo/index.html web-demo/hub-client.js web-demo/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p producers \
 && mkdir -p /out \
 && cp target/release/order-service target/release/payment-service \
       target/release/delivery-service target/release/moderation-service /out/

FROM base AS runtime
COPY --from=build /out/ /usr/local/bin/
