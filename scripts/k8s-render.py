#!/usr/bin/env python3
"""Renders envoy/k8s/kustomization.yaml without kubectl or kustomize, and checks it.

    scripts/k8s-render.py envoy/k8s > rendered.yaml

Supports what the kustomization uses: `namespace`, `labels` (pairs, without selectors),
`resources` (files of the directory) and `configMapGenerator` (`files`, with `key=path`,
and `options.labels`). The generated ConfigMap keeps its plain name (kustomize appends a
hash of the content; validation does not care). Checks, failing with a message:
  - every file the kustomization names exists, and every *.yaml beside it is a resource
    (a manifest added but not listed would never be applied);
  - every ConfigMap and Secret a workload mounts or reads exists in the output, except the
    Secrets created by documented commands (EXTERNAL_SECRETS, envoy/README.md).
Needs PyYAML (the kubernetes-validate venv has it).
"""
import os
import sys

import yaml

# Created by `kubectl create secret` (envoy/README.md, Kubernetes), never kept in git.
EXTERNAL_SECRETS = {"mcp-affinity-control-token", "mcp-affinity-replay-tls", "mcp-affinity-replay-tls-envoy"}
SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator"}


def fail(msg):
    sys.exit(f"k8s-render.py: {msg}")


def main(root):
    kpath = os.path.join(root, "kustomization.yaml")
    k = yaml.safe_load(open(kpath))
    unknown = set(k) - SUPPORTED
    if unknown:
        fail(f"{kpath}: fields this renderer does not support: {sorted(unknown)}")
    ns = k.get("namespace")
    labels = {}
    for entry in k.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            fail(f"{kpath}: labels with includeSelectors/includeTemplates are not supported")
        labels.update(entry.get("pairs", {}))

    docs = []
    listed = set()
    for res in k.get("resources", []):
        path = os.path.join(root, res)
        if not os.path.isfile(path):
            fail(f"{kpath}: resource {res} does not exist")
        listed.add(os.path.normpath(res))
        docs += [d for d in yaml.safe_load_all(open(path)) if d is not None]
    for name in sorted(os.listdir(root)):
        if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml" and name not in listed:
            fail(f"{root}/{name} is not in the kustomization's resources")

    for gen in k.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, rel = f.partition("=") if "=" in f else (os.path.basename(f), "", f)
            path = os.path.join(root, rel)
            if not os.path.isfile(path):
                fail(f"{kpath}: configMapGenerator {gen['name']}: {rel} does not exist")
            data[key] = open(path).read()
        meta = {"name": gen["name"]}
        if gen.get("options", {}).get("labels"):
            meta["labels"] = dict(gen["options"]["labels"])
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})

    for d in docs:
        meta = d.setdefault("metadata", {})
        if ns and d["kind"] != "Namespace":
            meta["namespace"] = ns
        if labels:
            meta["labels"] = {**meta.get("labels", {}), **labels}

    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        spec = (d.get("spec") or {}).get("template", {}).get("spec")
        if not spec:
            continue
        refs = []
        for v in spec.get("volumes", []):
            if "configMap" in v:
                refs.append(("ConfigMap", v["configMap"]["name"]))
            if "secret" in v:
                refs.append(("Secret", v["secret"]["secretName"]))
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                if "secretKeyRef" in src:
                    refs.append(("Secret", src["secretKeyRef"]["name"]))
                if "configMapKeyRef" in src:
                    refs.append(("ConfigMap", src["configMapKeyRef"]["name"]))
        for kind, name in refs:
            if (kind, name) not in have and not (kind == "Secret" and name in EXTERNAL_SECRETS):
                fail(f"{d['kind']} {d['metadata']['name']} uses {kind} {name}, which the kustomization does not define")

    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "envoy/k8s")
