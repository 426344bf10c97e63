# dbpool-operator: the entry points. `make test` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help build crd crd-check lint unit test env-up env-down env-status controlplane demo

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## Build the operator binary
	$(CARGO) build

crd: build ## Regenerate crds/dbpool.yaml from the Rust types, and its copies in the chart and deploy/
	./target/debug/dbpool-operator crd > crds/dbpool.yaml
	deploy/render.sh

crd-check: build ## Fail when crds/dbpool.yaml differs from the Rust types
	@./target/debug/dbpool-operator crd | diff -u crds/dbpool.yaml - \
	  || { echo "crds/dbpool.yaml is stale: run 'make crd'"; exit 1; }

lint: ## cargo fmt --check, clippy with warnings denied, the crate graph's rules, the code's shape
	$(CARGO) fmt --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	CARGO="$(CARGO)" hack/check-crate-graph.sh
	python3 hack/check-shape.py --self-test
	python3 hack/check-shape.py

unit: ## Unit and property tests only (no control plane, no PostgreSQL)
	$(CARGO) test --workspace --lib

controlplane: ## Build (once, cached) kube-apiserver, etcd and kubectl from the Go module proxy
	@hack/build-controlplane.sh >/dev/null

env-up: ## Start etcd + kube-apiserver + PostgreSQL under .local/; use as: eval "$(make -s env-up)"
	@hack/env.sh up

demo: ## Guided tour: env + operator + a DbPool through an outage (hack/demo.sh)
	@CARGO="$(CARGO)" hack/demo.sh

env-down: ## Stop what env-up (and demo) started (and delete its data; logs stay in .local/logs)
	@hack/env.sh down

env-status: ## Report whether the env-up environment runs
	@hack/env.sh status

test: lint crd-check ## Everything: lint, CRD drift, unit, property and integration tests (own control plane)
	@CARGO="$(CARGO)" hack/test.sh

# spec.gate with a real kube-proxy, inside a network namespace of its own (needs root).
test: gate
.PHONY: gate
gate: ## The gate tests in a private network namespace with kube-proxy (hack/gate-netns.sh)
	@CARGO="$(CARGO)" hack/gate-netns.sh

.PHONY: bench
bench: ## Scale and latency benchmark on a private control plane (BENCH_N="100 1000"; docs/benchmarks.md)
	$(CARGO) bench --bench scale --no-run
	@CARGO="$(CARGO)" hack/with-env.sh bench-runs -- $(CARGO) bench --bench scale

.PHONY: bench-slowness
bench-slowness: ## No false opens while latency climbs to 1.5 s per round trip and back; writes docs/bench-slowness.svg
	$(CARGO) bench --bench slowness --profile dev --no-run
	@CARGO="$(CARGO)" hack/with-env.sh bench-runs -- $(CARGO) bench --bench slowness --profile dev

.PHONY: bench-client
bench-client: ## dbpool-client vs deadpool-postgres, bb8, sqlx through real outages (docs/benchmarks.md)
	@CARGO="$(CARGO)" hack/bench-client.sh

.PHONY: soak soak-short
soak: ## Chaos soak: a seeded nemesis, the audit log as witness, checkers (SEED=… SOAK_S=…; docs/reliability.md)
	$(CARGO) build -p dbpool-operator -p dbpool-soak --bins
	@SEED="$(SEED)" SOAK_S="$(SOAK_S)" SOAK_BIN_DIR="$$(hack/build-controlplane.sh)" target/debug/dbpool-soak

# The fixed-seed short soak (60s of faults, about 3 minutes in all) runs with every `make test`.
test: soak-short
soak-short: ## The fixed-seed short soak of make test (SEED=27, SOAK_S=60)
	@$(MAKE) --no-print-directory soak SEED=27 SOAK_S=60

.PHONY: alerts
alerts: ## promtool check and unit tests of the chart's alert rules (tests/alerts)
	@hack/test-alerts.sh
test: alerts

.PHONY: dashboard
dashboard: ## Static checks of the Grafana dashboard: JSON, metric names, PromQL (promtool), chart
	@hack/test-dashboard.sh
test: dashboard

.PHONY: argocd-health
argocd-health: ## The Argo CD health check (docs/argocd-health.lua) in gopher-lua, every phase
	@cd hack/luahealth && GOFLAGS="-mod=mod -buildvcs=false" GOSUMDB="$${GOSUMDB:-off}" go test -count=1 ./...
test: argocd-health

.PHONY: image
image: ## The operator's and the client service's OCI images, without Docker (umoci; target/image/)
	@CARGO="$(CARGO)" hack/build-image.sh >/dev/null
	python3 hack/check-image.py --self-test

.PHONY: cluster cluster-down
cluster: ## A one-node cluster in a network namespace (containerd, kubelet; hack/cluster.sh): prints KUBECONFIG
	@hack/cluster.sh up

cluster-down: ## Stop the one-node cluster and delete its state
	@hack/cluster.sh down

# The chart in a one-node cluster with the daemonless image (needs root; docs/cluster.md).
test: test-node
.PHONY: test-node
test-node: ## The in-cluster test: image, one-node cluster, helm install, RBAC audit, /proc, outage, failover, PDB, gate, Prometheus (hack/test-node.sh)
	@CARGO="$(CARGO)" hack/test-node.sh
