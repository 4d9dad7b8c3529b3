# syntax=docker/dockerfile:1
# The control service image: built in a Rust image, shipped on distroless (glibc, CA
# certificates, no shell, no package manager), run as an unprivileged user.
#
#   docker build -f envoy/docker/control.Dockerfile -t mcp-affinity-control:dev .
#
# (from the repository root: the whole workspace is the build context, see
# control.Dockerfile.dockerignore). Build argument FEATURES=tls adds rediss:// support.

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
ARG FEATURES=""
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds; the binary is
# copied out of the cache mount before the stage ends.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p mcp-affinity-control ${FEATURES:+--features "$FEATURES"} \
 && install -D -m 0755 target/release/mcp-affinity-control /out/mcp-affinity-control

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/mcp-affinity-control /usr/local/bin/mcp-affinity-control
# distroless "nonroot": uid/gid 65532 (the k8s manifests use the same ids).
USER 65532:65532
EXPOSE 9901
# Listen on all interfaces of the container; pass the token with --token-file (a mounted
# Secret) or MCP_AFFINITY_CONTROL_TOKEN, and the store with --store.
ENV MCP_AFFINITY_CONTROL_LISTEN=0.0.0.0:9901
ENTRYPOINT ["/usr/local/bin/mcp-affinity-control"]
