#!/usr/bin/env bash
# Prints config/default rendered with the operator image set to $1 (for `make deploy`).
set -euo pipefail
img="${1:?usage: render-deploy.sh IMAGE[:TAG]}"
kubectl="${KUBECTL:-kubectl}"
root="$(cd "$(dirname "$0")/.." && pwd)"
name="${img%:*}"; tag="latest"
if [[ "${img##*/}" == *:* ]]; then tag="${img##*:}"; else name="${img}"; fi
overlay="$(mktemp -d)"
trap 'rm -rf "${overlay}"' EXIT
cp -r "${root}/config" "${overlay}/config"
cat > "${overlay}/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - config/default
images:
  - name: pequod
    newName: ${name}
    newTag: ${tag}
YAML
"${kubectl}" kustomize "${overlay}"
