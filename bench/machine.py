"""The machine a benchmark ran on, named in every report (table, JSON, plots).

A figure without its machine cannot be compared: the same engine is several
times faster where the CPU has AVX-512 BF16 / AMX than on an AVX2-only one.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

# The CPU flags that decide which kernels and GEMM paths exist.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(CPU model, flags) of the first processor; ("", empty) where there is no cpuinfo."""
    model, flags = "", set[str]()
    try:
        text = path.read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def describe(threads: int | None = None) -> dict[str, Any]:
    """CPU model, the flags that matter, cores, the threads the benchmark used (None
    where they are a served target's, not this process's), torch."""
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "flags": {f: f in flags for f in FLAGS},
        "torch_native_bf16": bool(torch.cpu._is_avx512_bf16_supported()
                                  or torch.cpu._is_amx_tile_supported()),
        "cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def line(m: dict[str, Any]) -> str:
    """One line for tables and plot titles."""
    flags = " ".join(("+" if on else "-") + f for f, on in m["flags"].items())
    used = f"{m['threads']} of " if m.get("threads") else ""
    return f"{m['cpu_model']} [{flags}] {used}{m['cpus']} cpus, torch {m['torch']}"
