#!/bin/sh
# Prints prometheusrule.yaml: the groups of alerts.yaml (the only source of the rules) as
# a Prometheus Operator PrometheusRule. Regenerate after editing alerts.yaml:
#   envoy/observability/prometheusrule.sh > envoy/observability/prometheusrule.yaml
# `make test-alerts` fails when the file differs from this output.
set -eu
dir=$(dirname "$0")
cat <<'HEAD'
# Generated from alerts.yaml by prometheusrule.sh: edit alerts.yaml, then run
#   envoy/observability/prometheusrule.sh > envoy/observability/prometheusrule.yaml
# The alerts and what to do about them: docs/alerts.md. The rules select control's
# metrics by job="mcp-affinity-control" (the job name a ServiceMonitor of the Service
# mcp-affinity-control gets) and the filter's by name (Envoy's /stats/prometheus).
# `release: ...` or other labels your Prometheus' ruleSelector wants: add them here.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: mcp-affinity
  namespace: mcp
  labels:
    app.kubernetes.io/name: mcp-affinity
    app.kubernetes.io/part-of: mcp-affinity
spec:
HEAD
# The rule file without its leading comment block, indented under `spec:`.
sed -n '/^groups:/,$p' "$dir/alerts.yaml" | sed 's/^\(.\)/  \1/'
