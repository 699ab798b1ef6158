"""Shared pieces of the Ray tests: free ports, cluster configs, /proc lookups, metrics."""

from __future__ import annotations

import os
import socket
import time
import urllib.request
from pathlib import Path

import yaml

from pdserve.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_yaml(path: Path, model_dir: Path, **extra: object) -> dict[str, object]:
    """A one-prefill, one-decode float32 cluster on free ports (float32 loads in seconds)."""
    config = {"model": str(model_dir), "dtype": "float32", "router_port": free_port(),
              "policy": "load_aware", "local_prefill_below": 1,  # every prompt remote
              "prefill": [{"port": free_port(), "metrics_port": free_port()}],
              "decode": [{"port": free_port(), "metrics_port": free_port()}], **extra}
    path.write_text(yaml.safe_dump(config))
    return config


def cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for {pid}")


def pids_with(*words: str) -> list[int]:
    """Live processes whose command line holds every word (e.g. a module and a port)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if all(w in args for w in words):
            found.append(int(d.name))
    return found


def metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith((name + "{", name + " ")))


def ask(router_port: int, timeout: float = 60) -> tuple[list[int], str]:
    """One short greedy request through the router, retried while workers (re)register."""
    deadline = time.monotonic() + timeout
    while True:
        client = Client(f"127.0.0.1:{router_port}", timeout=30)
        try:
            ids: list[int] = []
            plan = ""
            for d in client.generate("What is the capital of France?", max_tokens=4,
                                     ignore_eos=True):
                ids += d.token_ids
                plan = d.timings.get("plan", plan)
            return ids, plan
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        finally:
            client.close()


def blocks_free(*metrics_ports: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(metric(p, "pdserve:kv_cache_usage_perc") == 0 and
               metric(p, "pdserve:num_requests_running") == 0 for p in metrics_ports):
            return True
        time.sleep(0.1)
    return False
