# syntax=docker/dockerfile:1
# Envoy with the filter and a bootstrap baked in, for plain-Envoy deployments and local
# trials. Build the filter first, then from the repository root:
#
#   cargo build -p mcp-affinity-filter --target wasm32-wasip1 --profile wasm
#   docker build -f envoy/docker/envoy.Dockerfile -t mcp-affinity-envoy:dev .
#
# BOOTSTRAP=envoy/envoy-stateful-session.yaml selects the stateful-session variant.
# Run with MCP_AFFINITY_CONTROL_TOKEN set (the filter reads it through host_env_keys).

ARG ENVOY_IMAGE=envoyproxy/envoy:v1.39-latest
FROM ${ENVOY_IMAGE}
ARG BOOTSTRAP=envoy/envoy.yaml
COPY target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm /etc/envoy/mcp_affinity_filter.wasm
COPY ${BOOTSTRAP} /etc/envoy/envoy.yaml
EXPOSE 10000
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
