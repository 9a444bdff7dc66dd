# syntax=docker/dockerfile:1
# Pequod operator image: a release build of the binary, a native cue, and git (with ssh and
# CA certificates) for git module sources.

ARG RUST_VERSION=1.95
ARG GO_VERSION=1.26

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY cue ./cue
# Cargo.toml declares the benchmarks under tests/ and the test kit; cargo needs them to read
# the workspace's manifests.
COPY tests ./tests
COPY testkit ./testkit
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked && cp target/release/pequod /pequod

# cue at the version pinned in hack/tools/cue/go.mod, the one the tests run.
FROM docker.io/library/golang:${GO_VERSION}-bookworm AS cue
WORKDIR /tools
COPY hack/tools/cue/go.mod hack/tools/cue/go.sum ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /cue cuelang.org/go/cmd/cue

FROM docker.io/library/debian:bookworm-slim
# hack/image.sh builds the same image without Docker: it reads the packages, the accounts, ENV,
# USER and ENTRYPOINT from this stage, and runs the same hack/image/trim.sh (tests/image.rs
# checks that both images agree).
RUN --mount=type=bind,source=hack/image,target=/image \
    apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client ca-certificates \
    && /image/trim.sh / \
    # ssh refuses to run for a user id without a passwd entry.
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin nonroot
COPY --from=build /pequod /usr/local/bin/pequod
COPY --from=cue /cue /usr/local/bin/cue
# PATH as Debian's images set it, written here so that hack/image.sh, whose image has no base
# image to inherit it from, sets the same (git runs ssh by name).
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PEQUOD_CUE_BINARY=/usr/local/bin/cue \
    PEQUOD_GIT_BINARY=/usr/bin/git \
    PEQUOD_CACHE_DIR=/tmp/pequod-cache
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pequod"]
