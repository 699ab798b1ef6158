"""Vendor the upstream Kubernetes JSON schemas for the kinds pdserve's manifests use.

The schemas come from the PyPI package ``kubernetes-validate`` (which ships the
Kubernetes OpenAPI as JSON Schema, strict variant: unknown fields are errors).
Only the kinds below and the definitions they reach are kept, and descriptions
are dropped; nothing else is changed. Refresh:

    pip download --no-deps -d /tmp/kv kubernetes-validate==1.37.0
    python deploy/k8s/schemas/refresh_kubernetes.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

VERSION = "v1.37.0-local-strict"
KINDS = ["namespace-v1", "configmap-v1", "service-v1", "deployment-apps-v1",
         "networkpolicy-networking-v1"]
# Embedded in the KubeRay schemas (ray-cr.json): a Ray group's pod template.
EXTRA_DEFS = ["io.k8s.api.core.v1.PodTemplateSpec", "io.k8s.api.core.v1.ServiceSpec",
              "io.k8s.api.core.v1.ResourceRequirements"]
OUT = Path(__file__).with_name("kubernetes")


def strip_descriptions(node: Any, in_properties: bool = False) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v, k == "properties" and not in_properties)
                for k, v in node.items()
                if in_properties or not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        found = {ref.rsplit("/", 1)[1]} if isinstance(ref, str) and "/$defs/" in ref else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        def load(name: str) -> Any:
            return json.loads(z.read(f"kubernetes_validate/kubernetes-json-schema/{VERSION}/{name}"))
        defs_doc = load("_definitions.json")
        kinds = {k: load(f"{k}.json") for k in KINDS}
    all_defs = defs_doc["$defs"]
    todo, keep = set(EXTRA_DEFS).union(*(refs(s) for s in kinds.values())), set()
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo |= refs(all_defs[name]) - keep
    OUT.mkdir(exist_ok=True)
    defs_doc["$defs"] = {k: strip_descriptions(all_defs[k]) for k in sorted(keep)}
    (OUT / "_definitions.json").write_text(json.dumps(defs_doc, indent=1, sort_keys=True) + "\n")
    for k, s in kinds.items():
        (OUT / f"{k}.json").write_text(json.dumps(strip_descriptions(s), indent=1, sort_keys=True) + "\n")
    print(f"{len(kinds)} kinds, {len(keep)} definitions -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
