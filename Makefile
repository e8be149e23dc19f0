# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: test deps fmt-check clippy unit demo stop build-release loadtest-build

## test: install what is missing, then format check, lints, and every test.
test: deps fmt-check clippy
	$(CARGO) test --workspace --all-targets

deps:
	@infra/local/deps.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

build-release:
	$(CARGO) build --release -p hub -p loadtest

## demo: start a hub node in dev mode in the background and print the URL and a token.
demo: deps build-release
	@infra/local/demo.sh start

## stop: stop everything `make demo` started.
stop:
	@infra/local/demo.sh stop
