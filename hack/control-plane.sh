#!/usr/bin/env bash
# Provides kube-apiserver, kube-controller-manager and etcd for the local control plane
# used by the end-to-end tests and `make demo`.
#
# Order of preference:
#   1. KUBEBUILDER_ASSETS: a folder holding kube-apiserver and etcd (and optionally
#      kube-controller-manager), as controller-runtime's setup-envtest provides.
#   2. A cached build in $PEQUOD_K8S_CACHE (default ~/.cache/pequod/k8s-1.20.2).
#   3. On Debian-based machines: build Kubernetes 1.20.2 from Debian's source package.
#
# Prints the folder that holds the binaries on its last line of stdout.
set -euo pipefail

K8S_VERSION=1.20.2
DEB_VERSION="1.20.5+really1.20.2"
CACHE="${PEQUOD_K8S_CACHE:-${HOME}/.cache/pequod/k8s-${K8S_VERSION}}"

log() { echo "control-plane: $*" >&2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
  for b in kube-apiserver etcd; do
    [[ -x "${KUBEBUILDER_ASSETS}/${b}" ]] || { log "KUBEBUILDER_ASSETS=${KUBEBUILDER_ASSETS} has no executable ${b}"; exit 1; }
  done
  echo "${KUBEBUILDER_ASSETS}"
  exit 0
fi

if [[ -x "${CACHE}/bin/kube-apiserver" && -x "${CACHE}/bin/kube-controller-manager" && -x "${CACHE}/bin/etcd" ]]; then
  echo "${CACHE}/bin"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  cat >&2 <<MSG
control-plane: no kube-apiserver/etcd found and this is not a Debian-based machine.
Either
  - set KUBEBUILDER_ASSETS to a folder with kube-apiserver and etcd
    (for example: setup-envtest use -p path), or
  - set PEQUOD_TEST_KUBECONFIG to the kubeconfig of an existing cluster
    (kind, k3d, ...) to run the end-to-end tests there.
MSG
  exit 1
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi

log "building Kubernetes ${K8S_VERSION} from Debian's source package into ${CACHE} (about 8-10 minutes the first time)"

if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  log "adding a deb-src entry for Debian bookworm main"
  ${SUDO} tee /etc/apt/sources.list.d/pequod-deb-src.sources >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
${SUDO} apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq \
  golang-go rsync jq etcd-server golang-github-modern-go-reflect2-dev dpkg-dev openssl >&2

WORK="${CACHE}/src"
mkdir -p "${WORK}" "${CACHE}/bin"
cd "${WORK}"
ORIG="kubernetes_${DEB_VERSION}.orig.tar.gz"
if [[ ! -f "${ORIG}" ]]; then
  # bookworm ships ${DEB_VERSION}; anything else would be a different Kubernetes.
  apt-get source --download-only kubernetes >&2
fi
[[ -f "${ORIG}" ]] || { log "expected ${ORIG} from Debian's kubernetes source package"; exit 1; }
TREE="${WORK}/gopath/src/k8s.io/kubernetes"
if [[ ! -f "${TREE}/.pequod-prepared" ]]; then
  rm -rf "${WORK}/gopath" "${WORK}/extract"
  mkdir -p "${WORK}/extract" "$(dirname "${TREE}")"
  tar -xzf "${ORIG}" -C "${WORK}/extract"
  mv "${WORK}/extract/"* "${TREE}"
  # The vendored reflect2 1.0.1 crashes the apiserver under Go >= 1.18; Debian's copy works.
  rm -rf "${TREE}/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "${TREE}/vendor/github.com/modern-go/reflect2"
  touch "${TREE}/.pequod-prepared"
fi

export GOPATH="${WORK}/gopath" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=""
export GOCACHE="${CACHE}/gocache"
cd "${TREE}"
if [[ ! -f pkg/generated/openapi/zz_generated.openapi.go ]]; then
  log "make generated_files"
  make generated_files >&2
fi

LDFLAGS=""
for pkg in k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version k8s.io/kubernetes/vendor/k8s.io/component-base/version; do
  LDFLAGS+=" -X ${pkg}.gitVersion=v${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=20 -X ${pkg}.gitTreeState=clean"
done
for cmd in kube-apiserver kube-controller-manager; do
  log "go build ${cmd}"
  go build -ldflags "${LDFLAGS}" -o "${CACHE}/bin/${cmd}.tmp" "./cmd/${cmd}" >&2
  mv "${CACHE}/bin/${cmd}.tmp" "${CACHE}/bin/${cmd}"
done
ln -sf "$(command -v etcd)" "${CACHE}/bin/etcd"
# The source tree and Go build cache are only needed to rebuild.
log "done: $("${CACHE}/bin/kube-apiserver" --version)"
echo "${CACHE}/bin"
