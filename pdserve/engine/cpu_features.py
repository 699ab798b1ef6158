"""The instruction sets of the CPU this process runs on, read at run time.

Native kernels are compiled for one ISA level (``IsaLevel``): the highest level
whose every flag this CPU has. A module built for a level is only ever imported on
a CPU that has all of that level's flags, so a cache or image moved to an older CPU
rebuilds (or falls back to torch) instead of dying of SIGILL.

Flags come from /proc/cpuinfo (Linux); elsewhere from what torch reports.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

_CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class IsaLevel:
    name: str
    required: frozenset[str]  # /proc/cpuinfo flag names
    cflags: tuple[str, ...]  # compiler flags that enable exactly these


_AVX2 = IsaLevel("avx2", frozenset({"avx2", "fma"}), ("-mavx2", "-mfma"))
_AVX512 = IsaLevel(
    "avx512", _AVX2.required | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    _AVX2.cflags + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"))
_AVX512_BF16 = IsaLevel(
    "avx512bf16", _AVX512.required | {"avx512_bf16"}, _AVX512.cflags + ("-mavx512bf16",))
ISA_LEVELS: tuple[IsaLevel, ...] = (_AVX2, _AVX512, _AVX512_BF16)  # lowest first


def isa_level(name: str) -> IsaLevel:
    for level in ISA_LEVELS:
        if level.name == name:
            return level
    raise ValueError(f"unknown ISA level {name!r}")


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]

    @property
    def avx2(self) -> bool:
        return {"avx2", "fma"} <= self.flags

    @property
    def avx512(self) -> bool:
        return _AVX512.required <= self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def avx512_vnni(self) -> bool:
        return "avx512_vnni" in self.flags

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    def has(self, level: IsaLevel) -> bool:
        return level.required <= self.flags

    def best_level(self) -> IsaLevel | None:
        """The highest ISA level kernels can be built for here; None below AVX2."""
        usable = [level for level in ISA_LEVELS if self.has(level)]
        return usable[-1] if usable else None

    def key(self) -> str:
        """Short digest of model + flags: names per-CPU caches (kernel choices)."""
        text = self.model + "|" + " ".join(sorted(self.flags))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def describe(self) -> str:
        best = self.best_level()
        extras = [f for f in ("avx512_bf16", "avx512_vnni", "amx_tile") if f in self.flags]
        return f"{self.model} (kernels: {best.name if best else 'none'}; {' '.join(extras) or '-'})"


def parse_cpuinfo(text: str) -> CpuFeatures:
    """Features of the first processor listed in a /proc/cpuinfo text."""
    model, flags = "unknown", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuFeatures(model, flags)


def _from_torch() -> CpuFeatures:
    """Where there is no /proc/cpuinfo: the subset torch can tell."""
    cpu = torch.cpu
    checks = {"avx2": cpu._is_avx2_supported, "avx512f": cpu._is_avx512_supported,
              "avx512_vnni": cpu._is_vnni_supported,
              "avx512_bf16": cpu._is_avx512_bf16_supported, "amx_tile": cpu._is_amx_tile_supported}
    flags = {name for name, check in checks.items() if check()}
    if "avx2" in flags:
        flags.add("fma")  # every AVX2 CPU has FMA3
    if "avx512f" in flags:
        flags |= {"avx512bw", "avx512vl"}  # torch's AVX512 capability requires them
    return CpuFeatures(torch.backends.cpu.get_cpu_capability(), frozenset(flags))


@functools.cache
def detect() -> CpuFeatures:
    try:
        features = parse_cpuinfo(_CPUINFO.read_text())
    except OSError:
        return _from_torch()
    return features if features.flags else _from_torch()  # e.g. no x86 "flags" line
