#!/usr/bin/env bash
# Publishes a release of the version in Cargo.toml (which is also `pequod --version`, the chart's
# version and appVersion, checked by tests/chart.rs, and the image tag):
#   image  REGISTRY/pequod:VERSION, built by hack/image.sh;
#   chart  the OCI artifact oci://REGISTRY/charts/pequod:VERSION, whose default image is the
#          one above (the packaged values name REGISTRY/pequod).
# usage: REGISTRY=registry.example.com hack/release.sh [image|chart|all]   (default: all)
# PEQUOD_RELEASE_PLAIN_HTTP=true reaches a registry over plain HTTP (a local one).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
: "${REGISTRY:?release: set REGISTRY, e.g. REGISTRY=registry.example.com}"
what="${1:-all}"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "${root}/Cargo.toml" | head -n1)"
plain_http="${PEQUOD_RELEASE_PLAIN_HTTP:-false}"
helm="${HELM:-${root}/bin/helm}"
out="${root}/target/release-artifacts"
mkdir -p "${out}"

if [[ "${what}" == image || "${what}" == all ]]; then
  tls_verify=true
  [[ "${plain_http}" == true ]] && tls_verify=false
  IMG="${REGISTRY}/pequod:${version}" PEQUOD_IMAGE_TLS_VERIFY="${tls_verify}" "${root}/hack/image.sh"
fi

if [[ "${what}" == chart || "${what}" == all ]]; then
  staging="$(mktemp -d)"
  trap 'rm -rf "${staging}"' EXIT
  cp -r "${root}/charts/pequod" "${staging}/pequod"
  # The released chart's default image is the released image.
  sed -i "s|^  repository: pequod\$|  repository: ${REGISTRY}/pequod|" "${staging}/pequod/values.yaml"
  grep -q "^  repository: ${REGISTRY}/pequod\$" "${staging}/pequod/values.yaml" \
    || { echo "release: charts/pequod/values.yaml has no 'repository: pequod' line to point at ${REGISTRY}" >&2; exit 1; }
  "${helm}" package "${staging}/pequod" --version "${version}" --app-version "${version}" --destination "${out}" >/dev/null
  flags=()
  [[ "${plain_http}" == true ]] && flags+=(--plain-http)
  "${helm}" push "${out}/pequod-${version}.tgz" "oci://${REGISTRY}/charts" "${flags[@]}"
fi
