"""Which CPUs a worker process runs on: NUMA discovery (sysfs, NVML) and pinning.

A worker pins itself once, at process start, before torch starts its threads:

PLAN (read the topology, the allowed CPU set and, for a GPU worker, the GPU's
NUMA node) → PIN (``sched_setaffinity``) → THREADS (torch intra-op threads =
number of CPUs, unless set explicitly) → LOGGED (one structured line).

Where the CPUs come from, first match wins:

1. ``cpus`` given explicitly (cluster config): those, intersected with the
   allowed set.
2. A GPU worker: the CPUs of the GPU's NUMA node. NVML tells the node id
   (``nvmlDeviceGetNumaNodeId``), else the GPU's CPU affinity mask
   (``nvmlDeviceGetCpuAffinity``), else sysfs has the PCI device's
   ``numa_node``. A node without CPUs (e.g. a GPU's own memory node) is rejected
   and the next source is tried.
3. Spread: worker ``slot`` of ``slots`` on this machine gets node
   ``slot % nodes`` and its share of that node's allowed CPUs. On a 2-CPU box
   with two workers: slot 0 (prefill) → CPU 0, slot 1 (decode) → CPU 1.

GPU prefill beside CPU decode on one machine (``gpu_workers``: the first that many
slots compute on the GPU): the GPU workers take the GPU's NUMA node and the CPU
workers spread over the CPUs outside it. Where that node holds every allowed CPU
(one NUMA node), all of them spread as in 3, so neither side tramples the other.

Every step intersects with ``os.sched_getaffinity`` (cgroups, taskset, Ray);
a source whose CPUs all fall outside it is rejected with a logged reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("pdserve.placement")

PIN_MODES: tuple[str, ...] = ("auto", "off")


@dataclass(frozen=True)
class PlacementRequest:
    """What a worker asks for; validated here, at the boundary."""

    role: str = "worker"
    mode: str = "auto"
    """auto: pin as described in the module docstring; off: leave the process alone."""
    cpus: tuple[int, ...] | None = None
    """Explicit CPU ids (still intersected with the allowed set)."""
    slot: int = 0
    """This worker's index among the ``slots`` workers sharing this machine."""
    slots: int = 1
    threads: int | None = None
    """torch threads; None = one per chosen CPU."""
    gpu: bool = False
    """The worker computes on a GPU: place it next to that GPU."""
    gpu_workers: int = 0
    """Slots ``[0, gpu_workers)`` of this machine compute on the GPU, the rest on CPUs
    (0: no such split is known; a GPU worker then takes its whole node)."""

    def __post_init__(self) -> None:
        if self.mode not in PIN_MODES:
            raise ValueError(f"pin must be one of {PIN_MODES}, got {self.mode!r}")
        if not 0 <= self.slot < self.slots:
            raise ValueError(f"slot must be in [0, slots={self.slots}), got {self.slot}")
        if not 0 <= self.gpu_workers <= self.slots:
            raise ValueError(f"gpu_workers must be in [0, slots={self.slots}], "
                             f"got {self.gpu_workers}")
        if self.cpus is not None and (not self.cpus or min(self.cpus) < 0):
            raise ValueError(f"cpus must be a non-empty list of CPU ids, got {self.cpus!r}")


@dataclass(frozen=True)
class Decision:
    role: str
    cpus: tuple[int, ...] | None  # None = not pinned
    threads: int | None
    source: str  # explicit | gpu-numa-id | gpu-affinity | gpu-pci | beside-gpu | spread | off
    numa_node: int | None = None
    rejected: tuple[str, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {"role": self.role, "cpus": list(self.cpus) if self.cpus else None,
                "threads": self.threads, "source": self.source, "numa_node": self.numa_node,
                "rejected": list(self.rejected)}


def parse_cpulist(text: str) -> frozenset[int]:
    """``0-3,8,10-11`` → {0, 1, 2, 3, 8, 10, 11}; empty text → empty set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cpus)


def read_numa_nodes(sysfs: Path = Path("/sys")) -> dict[int, frozenset[int]]:
    """NUMA node id → its CPUs (possibly empty). No NUMA in sysfs → one node 0."""
    nodes: dict[int, frozenset[int]] = {}
    for d in sorted((sysfs / "devices/system/node").glob("node[0-9]*")):
        cpulist = d / "cpulist"
        if cpulist.exists():
            nodes[int(d.name[4:])] = parse_cpulist(cpulist.read_text())
    if not nodes:
        nodes[0] = frozenset(range(os.cpu_count() or 1))
    return nodes


@dataclass
class GpuLocality:
    """What NVML (and sysfs) say about the GPU this worker uses."""

    nvml: Any | None
    """The ``pynvml`` module or a fake with the same functions; None = NVML absent."""
    sysfs: Path = Path("/sys")
    visible: str | None = field(default_factory=lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))

    @classmethod
    def load(cls, sysfs: Path = Path("/sys")) -> GpuLocality:
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, sysfs)
        except Exception:  # no driver, no library: a CPU-only machine
            return cls(None, sysfs)

    def _handle(self) -> Any:
        first = (self.visible or "0").split(",")[0].strip()
        if first.startswith(("GPU-", "MIG-")):
            return self.nvml.nvmlDeviceGetHandleByUUID(first)  # type: ignore[union-attr]
        return self.nvml.nvmlDeviceGetHandleByIndex(int(first))  # type: ignore[union-attr]

    def candidates(self) -> list[tuple[str, int | None, frozenset[int] | None]]:
        """(source, node id, CPU set) guesses, best first; a failing source is skipped."""
        if self.nvml is None or self.visible == "":
            return []
        try:
            handle = self._handle()
        except Exception:
            return []
        out: list[tuple[str, int | None, frozenset[int] | None]] = []
        for source, probe in (("gpu-numa-id", self._numa_id), ("gpu-affinity", self._affinity),
                              ("gpu-pci", self._pci_node)):
            try:
                found = probe(handle)
            except Exception:
                continue
            if found is not None:
                out.append((source, *found))
        return out

    def _numa_id(self, handle: Any) -> tuple[int | None, None] | None:
        fn: Callable[[Any], int] | None = getattr(self.nvml, "nvmlDeviceGetNumaNodeId", None)
        node = fn(handle) if fn else -1
        return (node, None) if node is not None and node >= 0 else None

    def _affinity(self, handle: Any) -> tuple[None, frozenset[int]] | None:
        words = max(1, ((os.cpu_count() or 64) + 63) // 64)
        mask = self.nvml.nvmlDeviceGetCpuAffinity(handle, words)  # type: ignore[union-attr]
        cpus = frozenset(64 * w + b for w, word in enumerate(mask) for b in range(64)
                         if int(word) >> b & 1)
        return (None, cpus) if cpus else None

    def _pci_node(self, handle: Any) -> tuple[int, None] | None:
        bus = self.nvml.nvmlDeviceGetPciInfo(handle).busId  # type: ignore[union-attr]
        bus = bus.decode() if isinstance(bus, bytes) else str(bus)
        domain, _, rest = bus.lower().partition(":")
        path = self.sysfs / "bus/pci/devices" / f"{int(domain, 16):04x}:{rest}" / "numa_node"
        node = int(path.read_text().strip())
        return (node, None) if node >= 0 else None


def plan(req: PlacementRequest, nodes: dict[int, frozenset[int]], allowed: frozenset[int],
         gpu: GpuLocality | None = None) -> Decision:
    """Choose CPUs for ``req``; pure apart from the NVML calls in ``gpu``."""
    if req.mode == "off":
        return Decision(req.role, None, req.threads, "off")
    rejected: list[str] = []
    if req.cpus is not None:
        chosen = frozenset(req.cpus) & allowed
        if not chosen:
            raise ValueError(f"cpus {list(req.cpus)} are not among this process's allowed "
                             f"CPUs {sorted(allowed)}")
        return _decide(req, chosen, "explicit", None, rejected)
    split = 0 < req.gpu_workers < req.slots  # GPU and CPU workers share this machine
    near = _near_gpu(nodes, allowed, gpu, rejected) if gpu is not None and (
        req.gpu or split) else None
    if near is not None:
        source, node, cpus = near
        rest = allowed - cpus
        if split and not rest:
            rejected.append(f"{source}: NUMA node {node} holds every allowed CPU; "
                            "GPU and CPU workers share it by spread")
        elif req.gpu:
            return _decide(req, cpus, source, node, rejected)
        elif split:  # a CPU worker: the CPUs the GPU workers leave
            cpu_req = PlacementRequest(req.role, req.mode, None, req.slot - req.gpu_workers,
                                       req.slots - req.gpu_workers, req.threads)
            d = _spread(cpu_req, {n: c & rest for n, c in nodes.items()}, rest, rejected)
            return Decision(req.role, d.cpus, d.threads, "beside-gpu", d.numa_node, d.rejected)
    return _spread(req, nodes, allowed, rejected)


def _near_gpu(nodes: dict[int, frozenset[int]], allowed: frozenset[int], gpu: GpuLocality,
              rejected: list[str]) -> tuple[str, int | None, frozenset[int]] | None:
    """(source, node, usable CPUs) of the GPU's NUMA node, from the first source that
    names CPUs this process may use; None (reasons in ``rejected``) when none does."""
    for source, node, cpus in gpu.candidates():
        if cpus is None:
            cpus = nodes.get(node, frozenset()) if node is not None else frozenset()
        usable = cpus & allowed
        if not cpus:
            rejected.append(f"{source}: NUMA node {node} has no CPUs")
        elif not usable:
            rejected.append(f"{source}: CPUs {sorted(cpus)} are outside the allowed set")
        else:
            return source, node, usable
    if not rejected:
        rejected.append("gpu: NVML absent or the GPU not found")
    return None


def _spread(req: PlacementRequest, nodes: dict[int, frozenset[int]], allowed: frozenset[int],
            rejected: list[str]) -> Decision:
    usable = {n: sorted(c & allowed) for n, c in sorted(nodes.items()) if c & allowed}
    if not usable:  # sysfs and the allowed set disagree: trust the allowed set
        usable = {0: sorted(allowed)}
    ids = list(usable)
    node = ids[req.slot % len(ids)]
    sharing = [s for s in range(req.slots) if ids[s % len(ids)] == node]
    cpus, k = usable[node], sharing.index(req.slot)
    n = len(sharing)
    if n > len(cpus):  # more workers than CPUs: one CPU each, round robin
        share = [cpus[k % len(cpus)]]
    else:
        share = cpus[k * len(cpus) // n:(k + 1) * len(cpus) // n]
    return _decide(req, frozenset(share), "spread", node, rejected)


def _decide(req: PlacementRequest, cpus: frozenset[int], source: str, node: int | None,
            rejected: list[str]) -> Decision:
    threads = req.threads or len(cpus)
    return Decision(req.role, tuple(sorted(cpus)), threads, source, node, tuple(rejected))


def pin(req: PlacementRequest, sysfs: Path = Path("/sys")) -> Decision:
    """Plan, apply to this process and log; call before torch starts threads."""
    wants_gpu = req.gpu or 0 < req.gpu_workers < req.slots
    gpu = GpuLocality.load(sysfs) if wants_gpu and req.mode != "off" else None
    decision = plan(req, read_numa_nodes(sysfs), frozenset(os.sched_getaffinity(0)), gpu)
    if decision.cpus is not None:
        os.sched_setaffinity(0, decision.cpus)
    if decision.threads is not None:
        import torch

        torch.set_num_threads(decision.threads)
    f = decision.fields()
    log.info("placement role=%s cpus=%s threads=%s source=%s numa_node=%s rejected=%s",
             f["role"], f["cpus"], f["threads"], f["source"], f["numa_node"], f["rejected"],
             extra={"placement": f})
    return decision
