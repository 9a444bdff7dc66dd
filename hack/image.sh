#!/usr/bin/env bash
# Builds the operator image on a machine with no container engine and no registry to pull a base
# from, and pushes it to IMG (`make image IMG=registry/pequod:tag`). The image is the
# Dockerfile's, built another way:
#   - the base root filesystem comes from Debian's packages (mmdebstrap, bookworm, the essential
#     set plus the Dockerfile's packages), set up with the Dockerfile's accounts and trimmed by
#     the same hack/image/trim.sh; it must hold exactly the packages of hack/image/packages.lock
#     (`hack/image.sh --lock` rewrites the lock after Debian updates), and with the lock's
#     SOURCE_DATE_EPOCH the same packages give the same files;
#   - the release binary (cargo) and cue at the version of hack/tools/cue/go.mod, built the way
#     the Dockerfile's cue stage builds it (hack/install-tools.sh);
#   - ENV, USER and ENTRYPOINT read from the Dockerfile (hack/image/definition.py);
#   - assembled with buildah FROM scratch in two layers (the base, then the two binaries) and
#     pushed with buildah; the digest is written to target/image/digest.
# Environment: IMG (required), PEQUOD_IMAGE_TLS_VERIFY=false for a plain-HTTP registry,
# DEBIAN_MIRROR (default http://deb.debian.org/debian), CARGO_TARGET_DIR.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
out="${root}/target/image"
lock="${root}/hack/image/packages.lock"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "${out}"

for tool in mmdebstrap buildah python3; do
  command -v "${tool}" >/dev/null || { echo "image: ${tool} is required (Debian: apt-get install mmdebstrap buildah)" >&2; exit 1; }
done
eval "$(python3 "${root}/hack/image/definition.py" "${root}/Dockerfile")"

# The installed packages of a root filesystem tarball, one "name version" per line, sorted.
installed_packages() {
  tar -xOf "$1" ./var/lib/dpkg/status | awk '
    /^Package: / { name = $2 }
    /^Version: / { version = $2 }
    /^$/ { if (name != "") print name, version; name = "" }
    END { if (name != "") print name, version }' | sort
}

build_base() { # $1: output tarball; SOURCE_DATE_EPOCH fixes every timestamp inside
  local hooks=(--customize-hook="'${root}/hack/image/trim.sh' \"\$1\"")
  for account in "${IMAGE_ACCOUNTS[@]}"; do
    hooks+=(--customize-hook="chroot \"\$1\" ${account}")
  done
  mmdebstrap --quiet --format=tar --variant=essential --include="$(IFS=,; echo "${IMAGE_PACKAGES[*]}")" \
    "${hooks[@]}" bookworm "$1" "${mirror}"
}

epoch="$(sed -n 's/^# SOURCE_DATE_EPOCH=//p' "${lock}" 2>/dev/null || true)"
if [[ "${1:-}" == "--lock" ]]; then
  epoch="$(date +%s)"
  SOURCE_DATE_EPOCH="${epoch}" build_base "${out}/base-new.tar"
  { echo "# The packages of the image's base root filesystem (hack/image.sh --lock writes this file)."
    echo "# SOURCE_DATE_EPOCH=${epoch}"
    installed_packages "${out}/base-new.tar"; } > "${lock}"
  rm -f "${out}/base-new.tar"
  echo "image: wrote ${lock}" >&2
  exit 0
fi
[[ -n "${epoch}" ]] || { echo "image: ${lock} has no SOURCE_DATE_EPOCH; run hack/image.sh --lock" >&2; exit 1; }
: "${IMG:?image: set IMG to the image to push, e.g. IMG=localhost:5000/pequod:0.1.0}"

# The base, cached under a name that changes with everything it is built from.
base_key="$(cat "${lock}" "${root}/hack/image/trim.sh" <(declare -p IMAGE_PACKAGES IMAGE_ACCOUNTS) | sha256sum | cut -c1-16)"
base="${out}/base-${base_key}.tar"
if [[ ! -f "${base}" ]]; then
  echo "image: building the base root filesystem from Debian's packages (${mirror})" >&2
  SOURCE_DATE_EPOCH="${epoch}" build_base "${base%.tar}.partial.tar"
  if ! diff <(grep -v '^#' "${lock}") <(installed_packages "${base%.tar}.partial.tar") > "${out}/lock.diff"; then
    echo "image: the base differs from ${lock} (< locked, > built):" >&2
    cat "${out}/lock.diff" >&2
    echo "image: Debian updated these packages; review and run hack/image.sh --lock" >&2
    rm -f "${base%.tar}.partial.tar"
    exit 1
  fi
  mv "${base%.tar}.partial.tar" "${base}"
fi

echo "image: building the release binary and cue" >&2
# Tests that run this script pass on what cargo sets for them (CARGO_PKG_NAME, ...), and ring's
# build script reruns when those change: without them, every caller builds the same.
unset_cargo=()
while IFS='=' read -r name _; do
  case "${name}" in
    CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_BIN_EXE_* | CARGO_CRATE_NAME | CARGO_PRIMARY_PACKAGE | CARGO_TARGET_TMPDIR) unset_cargo+=(-u "${name}") ;;
  esac
done < <(env)
(cd "${root}" && env "${unset_cargo[@]}" cargo build --release --locked --quiet --bin pequod)
"${root}/hack/install-tools.sh" >/dev/null
binary="${CARGO_TARGET_DIR:-${root}/target}/release/pequod"
version="$("${binary}" --version | awk '{print $2}')"

buildah() { command buildah --root "${out}/storage" --runroot "${out}/run" --storage-driver vfs "$@"; }
base_image="localhost/pequod-base:${base_key}"
if ! buildah inspect --type image "${base_image}" >/dev/null 2>&1; then
  container="$(buildah from scratch)"
  buildah add --quiet "${container}" "${base}" / >/dev/null
  buildah commit --quiet --timestamp "${epoch}" --rm "${container}" "${base_image}" >/dev/null
fi
container="$(buildah from "${base_image}")"
trap 'buildah rm "${container}" >/dev/null 2>&1 || true' EXIT
buildah copy --quiet --chmod 0755 "${container}" "${binary}" /usr/local/bin/pequod >/dev/null
buildah copy --quiet --chmod 0755 "${container}" "${root}/bin/cue" /usr/local/bin/cue >/dev/null
env_flags=()
for pair in "${IMAGE_ENV[@]}"; do env_flags+=(--env "${pair}"); done
buildah config "${env_flags[@]}" --user "${IMAGE_USER}" --entrypoint "${IMAGE_ENTRYPOINT}" --cmd '' \
  --label "org.opencontainers.image.version=${version}" \
  --label "org.opencontainers.image.title=pequod" "${container}"
buildah commit --quiet --format oci --timestamp "${epoch}" "${container}" "${IMG}" >/dev/null
buildah push --quiet --tls-verify="${PEQUOD_IMAGE_TLS_VERIFY:-true}" --digestfile "${out}/digest" \
  "${IMG}" "docker://${IMG}"
echo "image: pushed ${IMG}@$(cat "${out}/digest") (pequod ${version})" >&2
