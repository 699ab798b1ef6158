"""pdserve/placement.py against fake sysfs trees and a fake NVML (never the real library)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pdserve.placement import GpuLocality, PlacementRequest, parse_cpulist, plan, read_numa_nodes

BUS = "00000000:3B:00.0"


def fake_sysfs(root: Path, nodes: dict[int, str], pci_node: int | None = None) -> Path:
    for n, cpulist in nodes.items():
        d = root / "devices/system/node" / f"node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpulist + "\n")
    if pci_node is not None:
        d = root / "bus/pci/devices/0000:3b:00.0"
        d.mkdir(parents=True)
        (d / "numa_node").write_text(f"{pci_node}\n")
    return root


class FakeNvml:
    """The pynvml functions placement.py calls; each answer is optional."""

    def __init__(self, numa_id: int | None = None, affinity: list[int] | None = None,
                 has_numa_fn: bool = True) -> None:
        self.numa_id, self.affinity = numa_id, affinity
        if not has_numa_fn:  # older drivers / bindings lack it
            self.nvmlDeviceGetNumaNodeId = None

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:  # noqa: N802
        return f"gpu{i}"

    def nvmlDeviceGetNumaNodeId(self, handle: Any) -> int:  # noqa: N802
        if self.numa_id is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.numa_id

    def nvmlDeviceGetCpuAffinity(self, handle: Any, words: int) -> list[int]:  # noqa: N802
        if self.affinity is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.affinity

    def nvmlDeviceGetPciInfo(self, handle: Any) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(busId=BUS.encode())


TWO_SOCKETS = {0: "0-3", 1: "4-7"}
ALL8 = frozenset(range(8))


def test_parse_cpulist() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpulist("\n") == frozenset()


def test_two_sockets_spread_one_worker_per_socket(tmp_path: Path) -> None:
    nodes = read_numa_nodes(fake_sysfs(tmp_path, TWO_SOCKETS))
    assert nodes == {0: frozenset(range(4)), 1: frozenset(range(4, 8))}
    got = [plan(PlacementRequest(slot=s, slots=2), nodes, ALL8) for s in range(2)]
    assert [d.cpus for d in got] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [d.threads for d in got] == [4, 4] and {d.source for d in got} == {"spread"}
    four = [plan(PlacementRequest(slot=s, slots=4), nodes, ALL8).cpus for s in range(4)]
    assert four == [(0, 1), (4, 5), (2, 3), (6, 7)]  # alternate sockets, then split them


def test_this_box_shape_prefill_cpu0_decode_cpu1(tmp_path: Path) -> None:
    nodes = read_numa_nodes(fake_sysfs(tmp_path, {0: "0-1"}))
    got = [plan(PlacementRequest(slot=s, slots=2), nodes, frozenset({0, 1})) for s in range(2)]
    assert [(d.cpus, d.threads) for d in got] == [((0,), 1), ((1,), 1)]
    four = [plan(PlacementRequest(slot=s, slots=4), nodes, frozenset({0, 1})).cpus
            for s in range(4)]  # --prefill 2 --decode 2: alternate CPUs
    assert four == [(0,), (1,), (0,), (1,)]


def test_cgroup_restricted_cpu_set(tmp_path: Path) -> None:
    nodes = read_numa_nodes(fake_sysfs(tmp_path, TWO_SOCKETS))
    allowed = frozenset({2, 3, 6})  # e.g. a container's cpuset
    got = [plan(PlacementRequest(slot=s, slots=2), nodes, allowed).cpus for s in range(2)]
    assert got == [(2, 3), (6,)]
    with pytest.raises(ValueError, match="allowed CPUs"):
        plan(PlacementRequest(cpus=(0, 1)), nodes, allowed)
    assert plan(PlacementRequest(cpus=(1, 2)), nodes, allowed).cpus == (2,)


def test_gpu_numa_id_wins(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, TWO_SOCKETS, pci_node=0)
    d = plan(PlacementRequest(gpu=True), read_numa_nodes(root), ALL8,
             GpuLocality(FakeNvml(numa_id=1), root, "0"))
    assert (d.cpus, d.source, d.numa_node, d.threads) == ((4, 5, 6, 7), "gpu-numa-id", 1, 4)


def test_cpu_less_gpu_node_is_rejected_then_affinity_mask_used(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, {**TWO_SOCKETS, 2: ""})  # node 2: the GPU's memory, no CPUs
    nvml = FakeNvml(numa_id=2, affinity=[0b11110000])
    d = plan(PlacementRequest(gpu=True), read_numa_nodes(root), ALL8, GpuLocality(nvml, root, "0"))
    assert (d.cpus, d.source) == ((4, 5, 6, 7), "gpu-affinity")
    assert d.rejected == ("gpu-numa-id: NUMA node 2 has no CPUs",)


def test_pci_numa_node_when_nvml_has_neither(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, TWO_SOCKETS, pci_node=1)
    nvml = FakeNvml(has_numa_fn=False)
    d = plan(PlacementRequest(gpu=True), read_numa_nodes(root), ALL8, GpuLocality(nvml, root, "0"))
    assert (d.cpus, d.source, d.numa_node) == ((4, 5, 6, 7), "gpu-pci", 1)


def test_gpu_node_outside_allowed_set_falls_back_to_spread(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, TWO_SOCKETS, pci_node=1)
    d = plan(PlacementRequest(gpu=True), read_numa_nodes(root), frozenset({0, 1}),
             GpuLocality(FakeNvml(numa_id=1), root, "0"))
    assert (d.cpus, d.source) == ((0, 1), "spread")
    assert any("outside the allowed set" in r for r in d.rejected)


def test_nvml_absent_spreads_and_says_why(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, TWO_SOCKETS)
    d = plan(PlacementRequest(gpu=True, slot=1, slots=2), read_numa_nodes(root), ALL8,
             GpuLocality(None, root, "0"))
    assert (d.cpus, d.source) == ((4, 5, 6, 7), "spread")
    assert d.rejected == ("gpu: NVML absent or the GPU not found",)


def test_off_and_validation(tmp_path: Path) -> None:
    nodes = read_numa_nodes(fake_sysfs(tmp_path, TWO_SOCKETS))
    assert plan(PlacementRequest(mode="off"), nodes, ALL8).cpus is None
    with pytest.raises(ValueError, match="pin must be one of"):
        PlacementRequest(mode="numa")
    with pytest.raises(ValueError, match="slot must be in"):
        PlacementRequest(slot=2, slots=2)


def test_no_numa_in_sysfs_means_one_node(tmp_path: Path) -> None:
    nodes = read_numa_nodes(tmp_path)
    assert list(nodes) == [0] and nodes[0]


def test_gpu_prefill_takes_the_gpus_node_cpu_decode_the_rest(tmp_path: Path) -> None:
    """The cloud-prefill / local-decode split on one machine: GPU on socket 1."""
    nodes = read_numa_nodes(fake_sysfs(tmp_path, TWO_SOCKETS))
    gpu = GpuLocality(FakeNvml(numa_id=1), tmp_path, visible="0")
    prefill = plan(PlacementRequest("prefill", slot=0, slots=3, gpu=True, gpu_workers=1),
                   nodes, ALL8, gpu)
    decode = [plan(PlacementRequest("decode", slot=s, slots=3, gpu_workers=1), nodes, ALL8, gpu)
              for s in (1, 2)]
    assert (prefill.cpus, prefill.source) == ((4, 5, 6, 7), "gpu-numa-id")
    assert [(d.cpus, d.source) for d in decode] == [((0, 1), "beside-gpu"), ((2, 3), "beside-gpu")]


def test_gpu_prefill_on_one_numa_node_shares_by_spread(tmp_path: Path) -> None:
    """One node holds every CPU: the GPU worker does not take them all from decode."""
    nodes = read_numa_nodes(fake_sysfs(tmp_path, {0: "0-7"}))
    gpu = GpuLocality(FakeNvml(numa_id=0), tmp_path, visible="0")
    got = [plan(PlacementRequest(slot=s, slots=2, gpu=s == 0, gpu_workers=1), nodes, ALL8, gpu)
           for s in range(2)]
    assert [(d.cpus, d.source) for d in got] == [((0, 1, 2, 3), "spread"), ((4, 5, 6, 7), "spread")]
    assert "holds every allowed CPU" in got[0].rejected[0]


def test_cpu_worker_without_a_gpu_split_ignores_the_gpu(tmp_path: Path) -> None:
    nodes = read_numa_nodes(fake_sysfs(tmp_path, TWO_SOCKETS))
    gpu = GpuLocality(FakeNvml(numa_id=1), tmp_path, visible="0")
    d = plan(PlacementRequest("decode", slot=1, slots=2), nodes, ALL8, gpu)
    assert (d.cpus, d.source) == ((4, 5, 6, 7), "spread")
    with pytest.raises(ValueError, match="gpu_workers"):
        PlacementRequest(slots=2, gpu_workers=3)
