# Entry points for people and CI. Every target installs what a fresh machine
# lacks first. Tests, benchmarks and the local cluster share one build
# profile, so RocksDB is compiled once.
CARGO ?= cargo

KUBE_DIR ?= $(CURDIR)/kube-cluster

.PHONY: deps kube kube-up kube-down up test bench bench-mutable bench-fs bench-csi sim lint manifests kind

deps:
	@scripts/install-deps.sh

## kube-apiserver, kube-controller-manager, kube-scheduler and kubelet from
## Debian's kubernetes source, built once and cached, for the Kubernetes tests.
kube:
	@e2e/kube/build-kubernetes.sh

## A local Kubernetes cluster (3 kubelet nodes in 3 zones, containerd) in
## $(KUBE_DIR), with Shoal's images built from this tree loaded; see
## docs/kubernetes.md. `make kube-down` stops it.
kube-up: deps kube
	$(CARGO) build --workspace --bins
	e2e/kube/build-images.sh $(KUBE_DIR)/images
	e2e/kube/start-cluster.sh $(KUBE_DIR)

kube-down:
	e2e/kube/stop-cluster.sh $(KUBE_DIR)

## Start a local 3-peer cluster on loopback (Ctrl-C stops it).
up: deps
	$(CARGO) run --bin shoal -- cluster up $(ARGS)

## Run every test: unit, model, and end-to-end with real peer processes.
test: deps kube
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

## Benchmark replicated immutable blocks on a 3-peer loopback cluster.
bench: deps
	$(CARGO) run -p shoal-e2e --bin bench-blocks

## Benchmark mutable blocks (per-block Multi-Paxos) on a 3-peer loopback cluster.
bench-mutable: deps
	$(CARGO) run -p shoal-e2e --bin bench-mutable

## The filesystem benchmark: the shared peer workload on a Shoal volume,
## native disk and GlusterFS, side by side (needs ../shared/bench/peers).
bench-fs: deps
	$(CARGO) build --bin shoal
	e2e/bench-fs.sh

## Benchmark the CSI driver: CreateVolume, NodePublishVolume, and
## CreateSnapshot of 10,000 files holding 10 MiB and 1 GiB.
bench-csi: deps
	$(CARGO) build --workspace --bins
	$(CARGO) run -p shoal-e2e --bin bench-csi

## Simulate placement and membership for 10,000 nodes.
sim: deps
	$(CARGO) run -p shoal-e2e --bin sim-placement

## Regenerate the CRD in manifests/ and the chart, and the install bundle.
manifests:
	SHOAL_UPDATE_MANIFESTS=1 $(CARGO) test -p shoal-operator --test manifests

## The user path (helm install, StorageCluster, PVCs, an edit) on a kind
## cluster; needs kind, helm and docker.
kind:
	e2e/kind-helm.sh

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
