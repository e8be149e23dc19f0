# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo

# Local ports (infra/local/*.sh read them) and the URLs the integration tests use.
export LOCAL_REDIS_PORT ?= 6379
export LOCAL_PG_PORT ?= 5432
export LOCAL_KAFKA_CLUSTER_PORT ?= 9192
HUB_TEST_REDIS_URL ?= redis://127.0.0.1:$(LOCAL_REDIS_PORT)
PRODUCERS_TEST_DATABASE_URL ?= postgres://notify:notify@127.0.0.1:$(LOCAL_PG_PORT)/postgres

.PHONY: api-docs-check test deps fmt-check clippy k6-check browser-deps demo stop build-release infra-up infra-down ops-check ops-deps images images-prebuilt compose-check

## test: install what is missing, then format check, lints, and every test (Rust unit and
## integration, the browser test in headless Chromium) against a local Redis, a local Redis
## Cluster (3 masters + 3 replicas), Kafka (one broker, and a three-broker cluster for the
## replication tests) and PostgreSQL. Stops afterwards only what this run started (also when
## tests fail); services already running, e.g. from `make infra-up`, are left running. Exits
## non-zero on any failure.
test: deps fmt-check clippy k6-check browser-deps ops-check api-docs-check compose-check
	@rec=$$(mktemp); \
	trap 'infra/local/infra.sh down --record "$$rec"' EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; \
	infra/local/infra.sh up --only redis,redis-cluster,kafka,kafka-cluster,postgres --record "$$rec" && \
	redis_cluster=$$(infra/local/redis-cluster.sh urls) && \
	kafka_cluster=$$(infra/local/kafka.sh cluster-brokers) && \
	echo "HUB_TEST_REDIS_URL=$(HUB_TEST_REDIS_URL) HUB_TEST_REDIS_CLUSTER_URLS=$$redis_cluster HUB_TEST_KAFKA_CLUSTER_BROKERS=$$kafka_cluster PRODUCERS_TEST_DATABASE_URL=$(PRODUCERS_TEST_DATABASE_URL) $(CARGO) test --workspace --all-targets" && \
	HUB_TEST_REDIS_URL=$(HUB_TEST_REDIS_URL) HUB_TEST_REDIS_CLUSTER_URLS=$$redis_cluster \
	  HUB_TEST_KAFKA_CLUSTER_BROKERS=$$kafka_cluster PRODUCERS_TEST_DATABASE_URL=$(PRODUCERS_TEST_DATABASE_URL) \
	  $(CARGO) test --workspace --all-targets

deps:
	@infra/local/deps.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## api-docs-check: the OpenAPI 3.1 of the hub and the order and moderation services (served at
## /api/openapi.json) and docs/asyncapi.yaml
## (AsyncAPI 3) validated by independent validators (infra/api-docs; needs node and npm).
api-docs-check:
	infra/api-docs/check.sh

## k6-check: type-check the k6 scripts (loadtest/k6) against @types/k6; needs node and npm.
k6-check:
	@command -v npm >/dev/null || { echo "k6-check: npm not found; install Node.js 18+ with npm (e.g. apt-get install nodejs npm) and retry" >&2; exit 1; }
	cd loadtest/k6 && npm ci --no-audit --no-fund && npx --no-install tsc -p .

## browser-deps: playwright-core for the browser test (web-demo/tests; it drives Debian's chromium).
browser-deps:
	@command -v npm >/dev/null || { echo "browser-deps: npm not found; install Node.js 18+ with npm and retry" >&2; exit 1; }
	cd web-demo/tests && npm ci --no-audit --no-fund

## ops-check: the deployment and observability checks: promtool (config, rules, the rules' unit
## tests), helm lint and template of the chart with its required properties, the rendered hub
## Deployment and a Redis pod run with `podman kube play` until the hub answers /readyz, and every Grafana
## panel query evaluated by a live Prometheus scraping a hub node and the four services (builds
## them, and starts Kafka and PostgreSQL unless they run, stopping only what it started).
## The images check builds both images from the debug binaries with podman (installed when
## missing) and runs them.
ops-check: ops-deps
	infra/prometheus/check.sh
	infra/helm/check.sh
	CARGO=$(CARGO) infra/helm/kube-play.sh
	CARGO=$(CARGO) infra/grafana/check.sh
	CARGO=$(CARGO) infra/docker/check.sh

## ops-deps: promtool and prometheus (Debian's, service not started), helm (go install), python3-yaml, kcat.
ops-deps:
	@infra/local/ops-deps.sh

## images: notification-hub/hub:dev and notification-hub/services:dev with podman or docker,
## compiled inside the build (rust:1-bookworm, from the engine's registry).
## images-prebuilt: the same images from the binaries of `make build-release` (no Rust image needed).
images:
	infra/docker/images.sh

images-prebuilt: build-release
	infra/docker/images.sh --prebuilt target/release

## compose-check: infra/compose/compose.yaml with podman-compose (installed when missing) under a
## project of its own: every service healthy, then an order's statuses CREATED -> ... -> DELIVERED
## on a hub node over SSE, each once and in order; takes the project down afterwards. Builds
## the registry-free stand-ins (infra/docker/standins) and the app images when missing.
compose-check:
	CARGO=$(CARGO) infra/compose/check.sh

build-release:
	$(CARGO) build --release -p hub -p loadtest -p producers

## infra-up / infra-down: start / stop the local Redis, Redis Cluster (3 masters + 3 replicas), Kafka (one broker,
## and a three-broker cluster) and PostgreSQL; idempotent.
infra-up:
	@infra/local/infra.sh up

infra-down:
	@infra/local/infra.sh down

## demo: start Redis, Kafka, PostgreSQL, two hub nodes (dev mode), the order, payment, delivery and
## moderation services in the background; wait until all are ready; print the URL and a token.
demo: deps build-release
	@infra/local/infra.sh up --only redis,kafka,postgres
	@infra/local/demo.sh start

## stop: stop everything `make demo` or `make infra-up` started (hub and services first, then the infrastructure).
stop:
	@infra/local/demo.sh stop
	@infra/local/infra.sh down
