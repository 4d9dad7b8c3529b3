#!/usr/bin/env bash
# `make test-k8s`: checks envoy/k8s (the Kustomize deployment) offline.
#   1. envoy/k8s/envoy/envoy.yaml is what scripts/k8s-bootstrap.py generates from the
#      default bootstrap envoy/envoy-stateful-session.yaml;
#   2. the kustomization renders (scripts/k8s-render.py; also `kubectl kustomize` when
#      kubectl is installed) and every object, and envoy/k8s/example-secrets/, passes
#      `kubernetes-validate --strict` for each Kubernetes version given;
#   3. the bootstrap in the rendered ConfigMap passes `envoy --mode validate`. Validate mode
#      opens the files the bootstrap names (and loads the wasm module, which parses its
#      configuration), so they are provided in a temporary directory: the built filter, and
#      replay-listener certificates from scripts/replay-certs.sh; /etc/envoy/ is rewritten
#      to that directory, nothing else. DNS names are not resolved in validate mode.
# Usage: scripts/k8s-validate.sh VENV ENVOY WASM VERSION...
#   VENV: a venv with kubernetes-validate (and PyYAML); VERSION: e.g. 1.30.0
set -euo pipefail
venv=${1:?usage: scripts/k8s-validate.sh VENV ENVOY WASM VERSION...}
envoy=${2:?}; wasm=${3:?}; shift 3
[ $# -gt 0 ] || { echo "k8s-validate.sh: no Kubernetes version given" >&2; exit 2; }
cd "$(dirname "$0")/.."
k8s=envoy/k8s
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

"$venv/bin/python" scripts/k8s-bootstrap.py | diff -u $k8s/envoy/envoy.yaml - >&2 || {
  echo "$k8s/envoy/envoy.yaml differs from the default bootstrap's rendering: run scripts/k8s-bootstrap.py > $k8s/envoy/envoy.yaml" >&2; exit 1; }

"$venv/bin/python" scripts/k8s-render.py $k8s > "$tmp/rendered.yaml"
# Also the example Secrets (not applied by the kustomization; their shape must be valid).
files=("$tmp/rendered.yaml" $k8s/example-secrets/*.yaml)
if command -v kubectl >/dev/null; then
  kubectl kustomize $k8s > "$tmp/kustomize.yaml"
  files+=("$tmp/kustomize.yaml")
fi
for v in "$@"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${files[@]}" || {
    echo "k8s-validate.sh: kubernetes-validate --strict failed for Kubernetes $v" >&2; exit 1; }
done
echo "envoy/k8s: $(grep -c '^kind:' "$tmp/rendered.yaml") objects pass kubernetes-validate --strict for Kubernetes $*$([ ${#files[@]} -gt 1 ] && echo ' (also as rendered by kubectl kustomize)')"

mkdir -p "$tmp/etc"
scripts/replay-certs.sh "$tmp/etc/replay-tls" 1 >/dev/null
cp "$wasm" "$tmp/etc/mcp_affinity_filter.wasm"
"$venv/bin/python" - "$tmp/rendered.yaml" "$tmp/etc" > "$tmp/bootstrap.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mcp-affinity-envoy-bootstrap"]
if len(cm) != 1:
    sys.exit("k8s-validate.sh: no ConfigMap mcp-affinity-envoy-bootstrap in the rendered kustomization")
sys.stdout.write(cm[0]["data"]["envoy.yaml"].replace("/etc/envoy/", sys.argv[2] + "/"))
PY
MCP_AFFINITY_CONTROL_TOKEN=validate "$envoy" --mode validate -c "$tmp/bootstrap.yaml" --log-level error >"$tmp/envoy.log" 2>&1 || {
  cat "$tmp/envoy.log" >&2; echo "k8s-validate.sh: envoy --mode validate rejects the ConfigMap's bootstrap" >&2; exit 1; }
echo "envoy/k8s: the ConfigMap's bootstrap passes envoy --mode validate ($("$envoy" --version 2>/dev/null | grep -o 'version: [^ ]*' | head -1))"
