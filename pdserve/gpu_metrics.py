"""GPU gauges read through NVML (nvidia-ml-py) under DCGM-exporter names and units,
so dashboards built for dcgm-exporter read them unchanged.

Registered only when NVML loads and sees at least one GPU; without a driver or a
GPU nothing is registered and nothing fails. Values are read at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LABELS = ["gpu", "UUID", "device", "modelName"]
_MIB = 1024 * 1024


class NvmlCollector(Collector):
    def __init__(self, nvml: Any, count: int) -> None:
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        n = self.nvml
        util = GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=_LABELS)
        used = GaugeMetricFamily("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).",
                                 labels=_LABELS)
        free = GaugeMetricFamily("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).",
                                 labels=_LABELS)
        power = GaugeMetricFamily("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).",
                                  labels=_LABELS)
        for i, h in enumerate(self.handles):
            labels = [str(i), _text(n.nvmlDeviceGetUUID(h)), f"nvidia{i}",
                      _text(n.nvmlDeviceGetName(h))]
            try:
                util.add_metric(labels, float(n.nvmlDeviceGetUtilizationRates(h).gpu))
                mem = n.nvmlDeviceGetMemoryInfo(h)
                used.add_metric(labels, mem.used / _MIB)
                free.add_metric(labels, mem.free / _MIB)
                power.add_metric(labels, n.nvmlDeviceGetPowerUsage(h) / 1000.0)  # mW → W
            except n.NVMLError as e:  # one unreadable GPU must not break the scrape
                log.warning("NVML read of GPU %d failed: %s", i, e)
        yield from (util, used, free, power)


def register_gpu_metrics(registry: CollectorRegistry, nvml: ModuleType | Any | None = None) -> bool:
    """Add the GPU gauges when NVML sees a GPU; return whether it did."""
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
    except Exception as e:  # no library, no driver, no GPU: no gauges
        log.debug("no GPU gauges: %s", e)
        return False
    if count == 0:
        return False
    registry.register(NvmlCollector(nvml, count))
    return True


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
