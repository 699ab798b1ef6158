"""Every kustomization renders (real kustomize) and every object validates offline.

Besides the schemas: the pods are locked down, the roles' arguments parse with the
roles' own argument parsers, the cluster ConfigMap agrees with the Deployments,
and the NetworkPolicies allow exactly client -> router -> decode -> prefill.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import K8S, errors, kustomizations, pod_specs, render

ROLES = {"router": 50051, "prefill": 50061, "decode": 50071}
METRICS = {"prefill": 9061, "decode": 9071}


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def deployment(objs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    return by_kind(objs, "Deployment")[f"pdserve-{role}"]


def test_every_kustomization_is_found() -> None:
    names = {str(p.relative_to(K8S)) for p in kustomizations()}
    assert names == {"base", "overlays/cpu", "overlays/gpu", "overlays/tls", "kuberay/cluster",
                     "kuberay/job", "kuberay/service"}


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_object_validates(directory: Path) -> None:
    objs = render(directory)
    assert objs
    for obj in objs:
        found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors(obj)]
        assert not found, f"{obj['kind']} {obj['metadata'].get('name')}: {found}"


def _base_deployment() -> dict[str, Any]:
    return copy.deepcopy(deployment(render(K8S / "base"), "prefill"))


def _ray(kind: str) -> dict[str, Any]:
    sub = {"RayCluster": "cluster", "RayJob": "job", "RayService": "service"}[kind]
    return copy.deepcopy(next(o for o in render(K8S / "kuberay" / sub) if o["kind"] == kind))


def _break(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = obj
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return obj


_DELETE = object()
BROKEN = {
    "replicas not an integer": ("Deployment", "spec.replicas", "one"),
    "grpc probe without port": ("Deployment",
                                "spec.template.spec.containers.0.readinessProbe.grpc.port", _DELETE),
    "misspelt container field": ("Deployment", "spec.template.spec.containers.0.imagePullPolicyy",
                                 "Always"),
    "bad port type": ("Deployment", "spec.template.spec.containers.0.ports.0.containerPort", "grpc"),
    "worker group without name": ("RayCluster", "spec.workerGroupSpecs.0.groupName", _DELETE),
    "negative replicas": ("RayCluster", "spec.workerGroupSpecs.0.replicas", -1),
    "unknown submission mode": ("RayJob", "spec.submissionMode", "ShellMode"),
    "pod template field misspelt": ("RayService",
                                    "spec.rayClusterConfig.headGroupSpec.template.spec.container", []),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_objects_are_rejected(case: str) -> None:
    kind, path, value = BROKEN[case]
    good = _base_deployment() if kind == "Deployment" else _ray(kind)
    assert not errors(good)
    assert errors(_break(good, path, value)), f"{case} was accepted"


def test_object_without_a_schema_is_an_error() -> None:
    with pytest.raises(KeyError, match="no schema"):
        errors({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x"}})


@pytest.mark.parametrize("directory", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_pods_are_locked_down(directory: Path) -> None:
    for obj in render(directory):
        for pod in pod_specs(obj):
            ctx = pod["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] != 0
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, c["name"]
                assert sc["readOnlyRootFilesystem"] is True, c["name"]
                assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
                assert re.fullmatch(r"pdserve:[\w.-]+", c["image"]), c["image"]


def _config(objs: list[dict[str, Any]]) -> dict[str, str]:
    return by_kind(objs, "ConfigMap")["pdserve-cluster"]["data"]


def _args(objs: list[dict[str, Any]], role: str) -> list[str]:
    """The container's arguments with $(VAR) expanded the way the kubelet does."""
    c = deployment(objs, role)["spec"]["template"]["spec"]["containers"][0]
    env = dict(_config(objs)) if c.get("envFrom") else {}
    env.update({e["name"]: e["value"] for e in c.get("env", [])})
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in c["args"]]


def _port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


@pytest.mark.parametrize("overlay", ["base", "overlays/cpu", "overlays/gpu"])
def test_roles_start_with_their_real_flags(overlay: str) -> None:
    from pdserve.worker_args import parse_args as worker_args
    from router.server import parse_args as router_args

    objs = render(K8S / overlay)
    for role, port in ROLES.items():
        c = deployment(objs, role)["spec"]["template"]["spec"]["containers"][0]
        module = "router" if role == "router" else f"{role}_worker"
        assert c["command"] == ["python", "-m", module]
        assert _port(c, "grpc") == port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, (role, probe)
        liveness = "liveness" if role == "router" else None  # the router's "" follows decode
        assert c["livenessProbe"]["grpc"].get("service") == liveness, role
        if role == "router":
            a = router_args(_args(objs, role))
            assert (a.host, a.port) == ("0.0.0.0", port)
            assert a.decode == ("pdserve-decode:50071",) and a.prefill == ("pdserve-prefill:50061",)
            assert _port(c, "http") == 8000
        else:
            w = worker_args(role, _args(objs, role))
            assert (w.host, w.port, w.metrics_port) == ("0.0.0.0", port, METRICS[role])
            assert _port(c, "metrics") == METRICS[role]
            assert w.engine.num_threads == int(c["resources"]["limits"]["cpu"])
            if role == "decode":  # only the prefill workers the router names
                assert w.prefill_allowlist == router_args(_args(objs, "router")).prefill


HEALTH = {"router": 50052, "prefill": 50062, "decode": 50072}


def test_tls_overlay_mounts_each_roles_certificate_and_probes_plaintext_health() -> None:
    """overlays/tls: the roles' own parsers see mTLS files that the pod mounts from the
    pdserve-tls Secret (its own key only); kubelet probes the plaintext health port."""
    from pdserve.worker_args import parse_args as worker_args
    from router.server import parse_args as router_args

    objs = render(K8S / "overlays" / "tls")
    for role in ROLES:
        pod = deployment(objs, role)["spec"]["template"]["spec"]
        c = pod["containers"][0]
        config = router_args(_args(objs, role)) if role == "router" else \
            worker_args(role, _args(objs, role))
        assert config.tls is not None and config.health_port == HEALTH[role] == _port(c, "health")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == HEALTH[role], (role, probe)
        mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
        assert mount["readOnly"] is True
        secret = next(v for v in pod["volumes"] if v["name"] == "tls")["secret"]
        assert secret["secretName"] == "pdserve-tls" and secret["defaultMode"] == 0o440
        files = {f"{mount['mountPath']}/{i['path']}" for i in secret["items"]}
        assert {config.tls.ca, config.tls.cert, config.tls.key} == files
        assert all(i["key"] in ("ca.pem", f"{role}.pem", f"{role}-key.pem")
                   for i in secret["items"])
        if role == "decode":  # exactly the prefill workers the router knows
            allowed = worker_args(role, _args(objs, role)).prefill_allowlist
            assert allowed == router_args(_args(objs, "router")).prefill
    router = router_args(_args(objs, "router"))
    assert router.tls is not None and not router.tls.require_client_cert  # optional on the API


def test_services_route_to_named_container_ports() -> None:
    objs = render(K8S / "base")
    services = by_kind(objs, "Service")
    assert {p["port"] for p in services["pdserve-router"]["spec"]["ports"]} == {50051, 8000}
    for name, svc in services.items():
        pod = by_kind(objs, "Deployment")[name]["spec"]["template"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names


def test_cluster_configmap_agrees_with_the_deployments(tmp_path: Path) -> None:
    from pdserve.cluster_config import ClusterConfig

    objs = render(K8S / "overlays" / "cpu")
    data = _config(objs)
    (tmp_path / "cluster.yaml").write_text(data["cluster.yaml"])
    cluster = ClusterConfig.from_yaml(tmp_path / "cluster.yaml")  # pdserve's own validation
    assert (data["PDSERVE_DTYPE"], data["PDSERVE_KV_ENCODING"]) == (cluster.dtype, cluster.kv_encoding)
    assert int(data["PDSERVE_LOCAL_PREFILL_BELOW"]) == cluster.local_prefill_below
    assert cluster.host == "0.0.0.0" and cluster.router_port == ROLES["router"]
    for role, members in (("prefill", cluster.prefill), ("decode", cluster.decode)):
        args = _args(objs, role)
        assert [(m.port, m.metrics_port) for m in members] == [(ROLES[role], METRICS[role])]
        assert f"--threads={members[0].threads}" in args


def _ingress(objs: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    policies = [p for p in by_kind(objs, "NetworkPolicy").values()
                if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == role]
    return [rule for p in policies for rule in p["spec"].get("ingress", [])]


def _peers(rules: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    return [peer for r in rules if port in {p["port"] for p in r.get("ports", [])}
            for peer in r.get("from", [{"anywhere": True}])]


def test_network_policy_allows_only_the_request_path() -> None:
    objs = render(K8S / "base")
    deny = by_kind(objs, "NetworkPolicy")["pdserve-default-deny"]["spec"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    assert deny["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "pdserve"}
    for role, client in (("prefill", "decode"), ("decode", "router")):
        peers = _peers(_ingress(objs, role), ROLES[role])
        labels = [p.get("podSelector", {}).get("matchLabels", {}) for p in peers]
        assert labels and all(lab.get("app.kubernetes.io/component") == client for lab in labels)
        assert all(set(p) == {"podSelector"} for p in peers)  # no namespace or IP peers
        # Every other rule only opens the metrics port.
        assert {p["port"] for r in _ingress(objs, role) for p in r["ports"]} == {ROLES[role],
                                                                                METRICS[role]}
    router = _ingress(objs, "router")
    assert _peers(router, 50051) == [{"anywhere": True}] == _peers(router, 8000)


def test_gpu_overlay_places_roles_on_their_pools() -> None:
    objs = render(K8S / "overlays" / "gpu")
    for role in ("prefill", "decode"):
        pod = deployment(objs, role)["spec"]["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == "1"
        assert res["requests"] == res["limits"], "Guaranteed QoS for the static CPU manager"
        assert str(res["limits"]["cpu"]).isdigit(), "whole CPUs for exclusive cores"
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        exprs = terms["nodeSelectorTerms"][0]["matchExpressions"]
        assert {"key": "pdserve/role", "operator": "In", "values": [role]} in exprs
    cpu = render(K8S / "overlays" / "cpu")
    assert all("nvidia.com/gpu" not in yaml.safe_dump(d) for d in by_kind(cpu, "Deployment").values())


def test_images_are_tagged_per_overlay() -> None:
    def images(overlay: str) -> set[str]:
        return {c["image"] for o in render(K8S / overlay) for pod in pod_specs(o)
                for c in [*pod.get("initContainers", []), *pod["containers"]]}

    assert images("overlays/cpu") == {"pdserve:latest"}
    assert images("overlays/gpu") == {"pdserve:latest-gpu"}


def test_kuberay_resources_run_the_ray_entrypoint_on_one_cluster_spec() -> None:
    cluster, job, service = _ray("RayCluster"), _ray("RayJob"), _ray("RayService")
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    entry = job["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "deploy.ray.job", "--config"]
    config = Path(entry[4])
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(config.parent))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "pdserve-cluster"
    assert config.name in _config(render(K8S / "kuberay" / "cluster"))
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["config"] == str(config)


def test_rayservice_serves_on_the_heads_serve_port_and_names_real_code() -> None:
    """Serve's proxy listens where the head exposes `serve`; the import path, its
    builder and the overridden deployment exist (tests/integration/test_ray_serve.py
    deploys this very config)."""
    spec = _ray("RayService")["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    head = spec["rayClusterConfig"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert serve.get("http_options", {}).get("port", 8000) == ports["serve"]
    app = serve["applications"][0]
    module, builder = app["import_path"].split(":")
    source = (K8S.parents[1] / (module.replace(".", "/") + ".py")).read_text()
    assert f"\ndef {builder}(args" in source
    for d in app.get("deployments", []):
        assert f"\nclass {d['name']}:" in source
        for resource in d.get("ray_actor_options", {}).get("resources", {}):
            assert resource in head["rayStartParams"]["resources"]


def test_prometheus_scrapes_each_roles_metrics_port() -> None:
    objs = render(K8S / "base")
    for role in ROLES:
        template = deployment(objs, role)["spec"]["template"]
        notes = template["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        expected = 8000 if role == "router" else METRICS[role]
        assert int(notes["prometheus.io/port"]) == expected
        assert expected in {p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
