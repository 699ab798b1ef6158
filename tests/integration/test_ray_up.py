"""``pdserve up`` on Ray, from outside: the real CLI on a local Ray instance, pinning
read from /proc, a worker and the router killed and restarted by Ray, Ctrl-C stopping
everything."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.ray_helpers import ask, blocks_free, cluster_yaml, cpus_allowed, pids_with

REPO = Path(__file__).resolve().parents[2]


class Up:
    def __init__(self, config: dict, proc: subprocess.Popen[str], ray_dir: str) -> None:
        self.config, self.proc, self.ray_dir = config, proc, ray_dir
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, "".join(self.lines[-40:])
            assert time.monotonic() < deadline, f"no {text!r}:\n" + "".join(self.lines[-40:])
            time.sleep(0.2)

    def pid(self, role: str) -> int:
        row = next(line.split() for line in self.lines if line.startswith(f"  {role} "))
        return int(row[row.index("pid") + 1])

    def port(self, role: str) -> int:
        return int(self.config[role][0]["port"])  # type: ignore[index]


@pytest.fixture(scope="module")
def up(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    path = tmp_path_factory.mktemp("ray-up") / "cluster.yaml"
    config = cluster_yaml(path, default_model_dir)
    ray_dir = tempfile.mkdtemp(prefix="pdray-", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_dir}
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.cli", "up", "--config", str(path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    u = Up(config, proc, ray_dir)
    try:
        u.wait_for("Ctrl-C stops the cluster", timeout=240)
        yield u
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only reached when a test failed early
        proc.wait()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.integration
def test_up_serves_on_ray_with_workers_pinned(up: Up) -> None:
    assert "on local Ray instance" in "".join(up.lines)
    if len(os.sched_getaffinity(0)) == 2:  # this box: prefill on CPU 0, decode on CPU 1
        assert cpus_allowed(up.pid("prefill")) == "0"
        assert cpus_allowed(up.pid("decode")) == "1"
    ids, plan = ask(int(up.config["router_port"]))  # type: ignore[arg-type]
    assert len(ids) == 4 and plan == "remote"
    assert blocks_free(up.config["prefill"][0]["metrics_port"],  # type: ignore[index]
                       up.config["decode"][0]["metrics_port"])  # type: ignore[index]


@pytest.mark.integration
def test_killed_worker_is_restarted_by_ray_and_registers_again(up: Up) -> None:
    old = up.pid("decode")
    os.kill(old, signal.SIGKILL)
    port = str(up.port("decode"))
    deadline = time.monotonic() + 90
    while not (new := [p for p in pids_with("decode_worker", port) if p != old]):
        assert time.monotonic() < deadline, "Ray did not restart the decode worker"
        time.sleep(0.2)
    ids, plan = ask(int(up.config["router_port"]), timeout=90)  # type: ignore[arg-type]
    assert len(ids) == 4 and plan == "remote"
    if len(os.sched_getaffinity(0)) == 2:
        assert cpus_allowed(new[0]) == "1"
    assert blocks_free(up.config["prefill"][0]["metrics_port"],  # type: ignore[index]
                       up.config["decode"][0]["metrics_port"])  # type: ignore[index]


@pytest.mark.integration
def test_killed_router_is_restarted_by_ray_and_serves_again(up: Up) -> None:
    port = str(up.config["router_port"])
    old = pids_with("router", port)
    assert len(old) == 1
    os.kill(old[0], signal.SIGKILL)
    deadline = time.monotonic() + 90
    while not [p for p in pids_with("router", port) if p != old[0]]:
        assert time.monotonic() < deadline, "Ray did not restart the router"
        time.sleep(0.2)
    ids, plan = ask(int(port), timeout=90)
    assert len(ids) == 4 and plan == "remote"
    assert up.proc.poll() is None, "pdserve up stopped on the router's restart"


@pytest.mark.integration
def test_ctrl_c_stops_every_process_and_the_local_ray(up: Up) -> None:
    ours = (pids_with("prefill_worker", str(up.port("prefill"))) +
            pids_with("decode_worker", str(up.port("decode"))) +
            pids_with("router", str(up.config["router_port"])))
    assert len(ours) == 3
    ray_procs = [p for p in _all_pids() if up.ray_dir in _cmdline(p)]  # gcs, raylet, workers
    assert ray_procs, "the local Ray instance was not under our temp dir"
    os.killpg(up.proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    assert up.proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in ours + ray_procs):
        assert time.monotonic() < deadline, "processes left after Ctrl-C"
        time.sleep(0.2)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        return state != "Z"
    except (OSError, IndexError):
        return False
