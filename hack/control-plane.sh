#!/usr/bin/env bash
# Provides the binaries of the local control plane used by the end-to-end tests, the
# benchmarks and `make demo`: etcd, kube-apiserver, kube-controller-manager and kube-scheduler
# (the release pinned in hack/tools/kubernetes/go.mod) and kwok (hack/tools/kwok/go.mod),
# which simulates nodes and their pods.
#
# Order of preference:
#   1. KUBEBUILDER_ASSETS: a folder holding at least kube-apiserver and etcd, as
#      controller-runtime's setup-envtest provides. Without kube-controller-manager,
#      kube-scheduler and kwok there, no pod ever runs and the tests that need one fail.
#   2. A cached build in ~/.cache/pequod/kubernetes-<version>-<hash of the go.mod files>.
#   3. A build from the Go module proxy with the go command (Go 1.26 or newer).
#
# Prints the folder that holds the binaries on its last line of stdout.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
kubernetes_mod="${root}/hack/tools/kubernetes"
kwok_mod="${root}/hack/tools/kwok"

log() { echo "control-plane: $*" >&2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  for b in kube-apiserver etcd; do
    [[ -x "${KUBEBUILDER_ASSETS}/${b}" ]] || { log "KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS} has no executable ${b}"; exit 1; }
  done
  echo "${KUBEBUILDER_ASSETS}"
  exit 0
fi

version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "${kubernetes_mod}/go.mod")"
[[ "${version}" =~ ^v1\.([0-9]+)\.[0-9]+$ ]] || { log "no k8s.io/kubernetes version in ${kubernetes_mod}/go.mod"; exit 1; }
minor="${BASH_REMATCH[1]}"
hash="$(cat "${kubernetes_mod}/go.mod" "${kubernetes_mod}/go.sum" "${kwok_mod}/go.mod" "${kwok_mod}/go.sum" "$0" | sha256sum | cut -c1-12)"
cache="${PEQUOD_K8S_CACHE:-${HOME}/.cache/pequod/kubernetes-${version}-${hash}}"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

complete() {
  local b
  for b in "${binaries[@]}"; do [[ -x "${cache}/bin/${b}" ]] || return 1; done
  [[ -f "${cache}/bin/kwok-stages.yaml" ]]
}

if complete; then
  echo "${cache}/bin"
  exit 0
fi

command -v go >/dev/null || { log "the go command (1.26 or newer) is needed to build Kubernetes ${version}, or set KUBEBUILDER_ASSETS"; exit 1; }

# One build at a time per cache folder: CI starts this script early, in the background,
# and the tests ask for the same folder again.
mkdir -p "${cache}"
exec 9>"${cache}/.lock"
flock 9
if complete; then
  echo "${cache}/bin"
  exit 0
fi

started=$(date +%s)
log "building Kubernetes ${version} (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) and kwok into ${cache} (about 15 minutes on 2 cores the first time)"
mkdir -p "${cache}/bin"
export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false"
# As Kubernetes' own hack/lib/version.sh does: both version packages carry the release, so
# that `--version` and the apiserver's /version agree.
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags+=" -X ${pkg}.gitVersion=${version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
done
(
  cd "${kubernetes_mod}"
  go build -trimpath -ldflags "${ldflags}" -o "${cache}/bin/.build/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler
  go build -trimpath -ldflags "-s -w" -o "${cache}/bin/.build/etcd" go.etcd.io/etcd/server/v3
)
(cd "${kwok_mod}" && go build -trimpath -ldflags "-s -w" -o "${cache}/bin/.build/kwok" sigs.k8s.io/kwok/cmd/kwok)
# kwok run on its own has no stages; these are the defaults kwokctl configures for a cluster
# of its own (nodes become Ready and hold a Lease; pods become Ready, complete and go away),
# taken from the same kwok release.
kwok_src="$(cd "${kwok_mod}" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
  pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
  echo "---"
  cat "${kwok_src}/kustomize/stage/${stage}.yaml"
done > "${cache}/bin/.build/kwok-stages.yaml"
mv "${cache}/bin/.build/"* "${cache}/bin/"
rmdir "${cache}/bin/.build"
log "done in $(( $(date +%s) - started )) s: $("${cache}/bin/kube-apiserver" --version), etcd $("${cache}/bin/etcd" --version | awk '/etcd Version/ {print $3}'), kwok $("${cache}/bin/kwok" --version 2>&1 | head -n1)"
echo "${cache}/bin"
