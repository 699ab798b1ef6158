"""``ray job submit`` against a local head: the job entrypoint brings the cluster up
on that head, a request is served, then the job and the head stop cleanly.

The head runs as ``ray start --head --block`` in its own session: stopping that
one process stops exactly this head, where ``ray stop`` would stop every Ray
instance on the machine (other sessions share it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.ray_helpers import ask, blocks_free, cluster_yaml, free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(ray_dir: str) -> dict[str, str]:
    # The head is started from the venv, so the job's `python` is the venv's python;
    # the working dir upload puts the repo on the job's PYTHONPATH.
    # Token authentication as Ray sets it up by default, with a token of this test's
    # own so that the head, the CLI and the job agree without touching ~/.ray.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PATH": f"{BIN}:{env.get('PATH', '')}", "RAY_TMPDIR": ray_dir,
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}


def _ray(*args: str, env: dict[str, str], timeout: float = 120) -> str:
    out = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, dict[str, str]]]:
    ray_dir = tempfile.mkdtemp(prefix="pdray-", dir="/tmp")
    env = _env(ray_dir)
    dash = free_port()
    resources = json.dumps({"pdserve_prefill": 1, "pdserve_decode": 1})
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--num-cpus=1", f"--resources={resources}", f"--temp-dir={ray_dir}",
         "--object-store-memory=100000000", "--disable-usage-stats"],
        env=env, cwd=ray_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert proc.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray dashboard did not come up"
            time.sleep(1)
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: stops this head's processes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _wait_gone(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)


def _wait_gone(ray_dir: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while left := [p for p in _pids() if ray_dir in _cmdline(p)]:
        if time.monotonic() > deadline:
            for p in left:
                os.kill(p, signal.SIGKILL)
            raise AssertionError(f"processes of the head left behind: {left}")
        time.sleep(0.5)


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.integration
def test_job_submit_serves_then_stops_cleanly(head: tuple[str, dict[str, str]],
                                              default_model_dir: Path, tmp_path: Path) -> None:
    address, env = head
    config = cluster_yaml(tmp_path / "cluster.yaml", default_model_dir)
    job = f"pdserve-test-{uuid.uuid4().hex[:8]}"
    _ray("job", "submit", "--address", address, "--submission-id", job, "--no-wait",
         "--working-dir", str(REPO), "--", "python", "-m", "deploy.ray.job",
         "--config", str(tmp_path / "cluster.yaml"), env=env)
    try:
        ids, plan = ask(int(config["router_port"]), timeout=180)  # type: ignore[call-overload]
        assert len(ids) == 4 and plan == "remote"
        assert blocks_free(config["prefill"][0]["metrics_port"],  # type: ignore[index]
                           config["decode"][0]["metrics_port"])  # type: ignore[index]
    except BaseException:
        print(_ray("job", "logs", "--address", address, job, env=env)[-4000:])
        raise
    finally:
        subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job], env=env,
                       capture_output=True, timeout=120)
    assert "was stopped" in _ray("job", "status", "--address", address, job, env=env)
    deadline = time.monotonic() + 30
    ports = [str(config["router_port"]), str(config["prefill"][0]["port"]),  # type: ignore[index]
             str(config["decode"][0]["port"])]  # type: ignore[index]
    while [p for p in _pids() if any(f" {port} " in _cmdline(p) + " " for port in ports)
           and ("_worker" in _cmdline(p) or "router" in _cmdline(p))]:
        assert time.monotonic() < deadline, "role processes left after ray job stop"
        time.sleep(0.5)


@pytest.mark.integration
def test_job_without_arguments_serves_the_packaged_config(
        head: tuple[str, dict[str, str]]) -> None:
    """`ray job submit ... -- python -m deploy.ray.job`, as the README has it: the
    packaged deploy/ray/cluster.yaml, on its fixed ports."""
    import yaml

    address, env = head
    config = yaml.safe_load((REPO / "deploy" / "ray" / "cluster.yaml").read_text())
    router, prefill, decode = config["router_port"], config["prefill"][0], config["decode"][0]
    ports = [router, prefill["port"], prefill["metrics_port"], decode["port"],
             decode["metrics_port"]]
    if any(_busy(p) for p in ports):
        pytest.skip(f"the packaged config's ports {ports} are in use on this machine")
    job = f"pdserve-test-{uuid.uuid4().hex[:8]}"
    _ray("job", "submit", "--address", address, "--submission-id", job, "--no-wait",
         "--working-dir", str(REPO), "--", "python", "-m", "deploy.ray.job", env=env)
    try:
        ids, _ = ask(router, timeout=300)
        assert len(ids) == 4
        assert blocks_free(prefill["metrics_port"], decode["metrics_port"])
    except BaseException:
        print(_ray("job", "logs", "--address", address, job, env=env)[-4000:])
        raise
    finally:
        subprocess.run([str(BIN / "ray"), "job", "stop", "--address", address, job], env=env,
                       capture_output=True, timeout=120)
    assert "was stopped" in _ray("job", "status", "--address", address, job, env=env)


def _busy(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False
