# Pequod developer tasks. `make help` lists them.

IMG ?= pequod:latest
CARGO ?= cargo
BIN := $(CURDIR)/bin
KUBECTL ?= $(BIN)/kubectl
CUE ?= $(BIN)/cue
export PATH := $(BIN):$(PATH)

.PHONY: help
help: ## List the targets.
	@grep -E '^[a-z-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

.PHONY: tools
tools: ## Install the pinned cue (hack/tools/cue, built with go) and kubectl 1.31 into bin/.
	hack/install-tools.sh

.PHONY: control-plane
control-plane: ## Provide the local control plane and kwok (KUBEBUILDER_ASSETS, cache, or build once).
	@if [ -z "$$PEQUOD_TEST_KUBECONFIG" ]; then hack/control-plane.sh >/dev/null; fi

.PHONY: build
build: ## Build the operator binary (target/release/pequod).
	$(CARGO) build --release --locked

.PHONY: manifests
manifests: ## Write the CRDs generated from the Rust types to config/crd/bases and the Helm chart.
	$(CARGO) run --quiet --locked -- crd --output-dir config/crd/bases
	cp config/crd/bases/*.yaml charts/pequod/crds/

.PHONY: generate
generate: manifests ## Run every generator of committed files (today the CRDs; see docs/development.md).

.PHONY: lint
lint: ## rustfmt check and clippy with warnings as errors.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

.PHONY: test-unit
test-unit: ## Pure tests, in seconds: the library's unit tests and the static checks (no cluster, no tools).
	$(CARGO) test --locked --lib --test manifests --test versions --test conformance

.PHONY: test
test: tools control-plane ## Unit and end-to-end tests against a local control plane.
	$(CARGO) test --locked --workspace

.PHONY: test-compat
test-compat: tools control-plane ## End-to-end subset on the same control plane emulating the oldest supported Kubernetes (1.34).
	PEQUOD_TEST_EMULATED_VERSION=1.34 $(CARGO) test --locked --test e2e -- smoke:: executor:: instances:: transforms:: rollouts::

.PHONY: bench-render
bench-render: tools ## Benchmark rendering: 1 against 100 instances, and a cached resync.
	$(CARGO) bench --locked --bench render

.PHONY: bench-instances
bench-instances: tools control-plane ## Benchmark instances: 500 created at once, a resync and a restart.
	$(CARGO) bench --locked --bench instances

.PHONY: bench-versions
bench-versions: tools control-plane ## Benchmark versions: a storage migration of 500 instances and a list of them converted by the webhook.
	$(CARGO) bench --locked --bench versions

.PHONY: bench-scale
bench-scale: tools control-plane ## Benchmark 1,000, 5,000 and 10,000 instances (PEQUOD_SCALE_SIZES): time, memory, writes, rest, restart.
	$(CARGO) bench --locked --bench scale

.PHONY: bench-plan
bench-plan: tools control-plane ## Benchmark planning a module change for 500 instances: the CLI and the operator.
	$(CARGO) bench --locked --bench plan

.PHONY: bench-sources
bench-sources: tools ## Benchmark git and OCI module fetches: cold, cached, and a dead registry.
	$(CARGO) bench --locked --bench sources

.PHONY: bench-executor
bench-executor: tools control-plane ## Benchmark the executor against direct applies; resync writes; memory.
	$(CARGO) bench --locked --bench executor

.PHONY: bench-graph
bench-graph: tools control-plane ## Benchmark one graph of 1,000 nodes against one of 100: time, CPU, memory, requests, bytes.
	$(CARGO) bench --locked --bench graph

.PHONY: demo
demo: tools control-plane ## Run the operator on a local control plane with the samples (Ctrl-C stops).
	$(CARGO) build --locked --bin pequod
	$(CARGO) run --locked --quiet -p pequod-testkit --bin demo

.PHONY: install
install: tools ## Install the CRDs into the cluster of the current kubeconfig.
	$(KUBECTL) apply --server-side -k config/crd

.PHONY: uninstall
uninstall: tools ## Remove the CRDs (and with them every Transform and ResourceGraph).
	$(KUBECTL) delete --ignore-not-found -k config/crd

.PHONY: run
run: tools ## Run the operator locally against the current kubeconfig.
	$(CARGO) run --locked -- --zap-encoder=console --cue-binary=$(CUE) --metrics-bind-address=127.0.0.1:8443 --health-probe-bind-address=127.0.0.1:8081 \
		--webhook-bind-address=127.0.0.1:9443 --webhook-url=https://127.0.0.1:9443

.PHONY: deploy
deploy: tools ## Deploy the operator with image IMG (default pequod:latest).
	KUBECTL=$(KUBECTL) hack/render-deploy.sh $(IMG) | $(KUBECTL) apply --server-side -f -

.PHONY: undeploy
undeploy: tools ## Remove the operator and its CRDs.
	$(KUBECTL) delete --ignore-not-found -k config/default

.PHONY: docker-build
docker-build: ## Build the container image IMG with Docker (the Dockerfile).
	docker build -t $(IMG) .

.PHONY: image
image: tools ## Build the same image without Docker, from Debian's packages, and push it to IMG.
	IMG=$(IMG) hack/image.sh

.PHONY: release
release: tools ## Push the image REGISTRY/pequod:VERSION and the chart oci://REGISTRY/charts/pequod:VERSION.
	REGISTRY=$(REGISTRY) hack/release.sh all
