# corral — developer commands. `make demo` runs the example; `make test` runs everything.
VENV ?= .venv
PY := $(VENV)/bin/python
CARGO ?= cargo

.PHONY: all build release profiling demo demo-deps test test-deps test-pip system-deps lint fmt clean bench bench-mq bench-socketio bench-relay bench-idle fuzz man image test-container wheel

all: build

build:
	$(CARGO) build

# The shipped build (stripped).
release:
	$(CARGO) build --release

# The release build with symbols: benchmarks and profiling use it.
profiling:
	$(CARGO) build --profile profiling

# Man pages (target/man/corral.1 and one per subcommand).
man: build
	target/debug/corral man target/man

# System packages (Debian): installed when missing if run as root, else the one
# command to run is printed.
system-deps:
	scripts/system-deps

# Python venv and node packages the end-to-end tests use.
test-deps: system-deps $(VENV)/.installed tests/apps/node/node_modules/.installed

$(VENV)/.installed: tests/requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r tests/requirements.txt
	touch $@

tests/apps/node/node_modules/.installed: tests/apps/node/package.json
	cd tests/apps/node && npm install --no-audit --no-fund --silent
	touch $@

# Runs the chat example as the seed ran it (examples/chat/corral.toml): five gunicorn
# workers started by corral, https://127.0.0.1:8443/ (demo / demo), status on :9000.
# Only what the demo needs: Python, and a venv from the example's own requirements.
DEMOVENV := target/demo-venv
demo: demo-deps release $(DEMOVENV)/.installed
	PATH="$(CURDIR)/$(DEMOVENV)/bin:$$PATH" target/release/corral run -c examples/chat/corral.toml

demo-deps:
	scripts/system-deps demo

$(DEMOVENV)/.installed: examples/chat/requirements.txt
	test -x $(DEMOVENV)/bin/python || python3 -m venv $(DEMOVENV)
	$(DEMOVENV)/bin/pip install -q -r examples/chat/requirements.txt
	touch $@

# The container image, localhost/corral:latest, with docker when its engine runs,
# else podman (runc, cgroupfs, ulimits within this machine's hard limits, host
# network for the build). Without PULL=1 podman builds on bases made from Debian's
# packages (scripts/container-bases), since no image can be pulled here.
IMAGE ?= localhost/corral:latest
PODMAN := podman --runtime runc --cgroup-manager cgroupfs
LIMITS := --ulimit nofile=10000:10000 --ulimit nproc=4096:4096
COMMIT := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
image:
	scripts/system-deps container
	if docker info >/dev/null 2>&1; then \
	  docker build -t $(IMAGE) --build-arg CORRAL_COMMIT=$(COMMIT) . ; \
	elif [ "$(PULL)" = 1 ]; then \
	  $(PODMAN) build --format docker --network host $(LIMITS) -t $(IMAGE) --build-arg CORRAL_COMMIT=$(COMMIT) . ; \
	else \
	  scripts/container-bases && \
	  $(PODMAN) build --format docker --network host $(LIMITS) -t $(IMAGE) \
	    --build-arg CORRAL_COMMIT=$(COMMIT) \
	    --build-arg RUST_IMAGE=localhost/corral-rust:bookworm \
	    --build-arg PYTHON_IMAGE=localhost/corral-python:bookworm . ; \
	fi

# The image run for real: host network, the chat example as `make demo` runs it,
# clients over wss with basic auth, the health check, a clean `stop`.
test-container: image $(VENV)/.installed
	CORRAL_IMAGE=$(IMAGE) $(VENV)/bin/pytest tests/container -q

test: system-deps build test-deps
	$(CARGO) test
	$(VENV)/bin/pytest tests/e2e

# A wheel for other machines, tagged manylinux after maturin's compatibility check
# (the binary needs glibc 2.34: Debian 12, Ubuntu 22.04, RHEL 9 and later).
WHEELVENV := target/wheel-venv
MANYLINUX ?= manylinux_2_34
wheel:
	test -x $(WHEELVENV)/bin/maturin || { python3 -m venv $(WHEELVENV) && $(WHEELVENV)/bin/pip install -q "maturin>=1.5,<2"; }
	$(WHEELVENV)/bin/maturin build --release --locked --compatibility $(MANYLINUX) --out target/wheels
	ls target/wheels/*$(MANYLINUX)*.whl

# The pip way: the manylinux wheel (`make wheel`, maturin's compatibility check
# passed) installed in a fresh venv, `corral --version`, and a supervisor end-to-end
# test run with that binary. `pip install ./` from a checkout runs the same maturin
# build.
PIPVENV := target/pip-venv
test-pip: wheel $(VENV)/.installed
	rm -rf $(PIPVENV) && python3 -m venv $(PIPVENV)
	$(PIPVENV)/bin/pip install -q target/wheels/corral_socketio-*-$(MANYLINUX)_x86_64.whl
	$(PIPVENV)/bin/corral --version
	CORRAL_BIN=$(CURDIR)/$(PIPVENV)/bin/corral $(VENV)/bin/pytest tests/e2e/test_supervisor.py -q -k starts_four_workers

# corral vs nginx and HAProxy (HTTP, websocket echo, idle websocket memory) and the
# embedded broker vs redis-server; installs nginx, haproxy, wrk, redis-server if
# missing. Benchmarks, not tests: results go in docs/benchmarks.md.
bench: bench-mq bench-socketio bench-relay
	bench/proxies.sh 3 | tee target/bench-proxies.md
	bench/http.sh 3 | tee target/bench-http.md

# The websocket relay alone (frames to 200 websockets, plain and TLS) through
# corral, nginx and HAProxy: CPU per delivered frame, added latency, RSS.
bench-relay:
	bench/relay.sh 3 | tee target/bench-relay.md

# Idle websockets at scale (root: raises descriptor limits; 100,000 by default).
bench-idle:
	bench/idle.sh $(IDLE_CONNS) | tee target/bench-idle.md

# Socket.IO through corral vs the seed's nginx ip_hash, Flask-SocketIO on 2 workers.
bench-socketio: profiling $(VENV)/.installed
	command -v nginx >/dev/null || (apt-get update -q && apt-get install -y -q nginx)
	$(PY) bench/sio_bench.py 3 | tee target/bench-socketio.md

# Message queue: embedded broker vs redis-server (a benchmark, not a test).
bench-mq:
	bench/broker.sh 3 | tee target/bench-mq.md

# Fuzz the htpasswd parser, the path normaliser, the RESP parser, corral's
# HTTP/1.1 readers and http1 against hyper (framing), FUZZ_SECONDS
# each (not part of `make test`). cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP
# lets the stable toolchain use them, and -s none skips the sanitizer runtime.
FUZZ_SECONDS ?= 30
IDLE_CONNS ?= 100000
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for t in htpasswd path resp http1 http1_hyper; do \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s none $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
