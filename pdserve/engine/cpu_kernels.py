"""pdserve's compiled CPU kernels (``csrc/``), built once into the cache.

Built with torch's C++ extension loader (ninja + the system compiler) the first
time they are needed and reused after; a machine without AVX2 or without a
compiler gets ``None`` and the engine falls back to plain torch ops.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_SOURCES = ("bindings.cpp", "bf16_gemv.cpp", "decode_ops.cpp")
_module: Any = None
_tried = False


def load() -> Any:
    """The kernel module (``linear_bf16w``, ``rms_norm``, ``rope_store_kv``,
    ``paged_decode_attention``), or None where it cannot be built."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if not torch.cpu._is_avx2_supported():
        return None
    from pdserve.engine.model_loader import cache_root

    build = cache_root() / "ext" / f"torch-{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    csrc = Path(__file__).with_name("csrc")
    try:
        from torch.utils.cpp_extension import load as load_extension

        # -fopenmp: at::parallel_for is a header template; without it the kernels
        # silently run on one thread.
        _module = load_extension(
            name="pdserve_cpu_kernels", sources=[str(csrc / s) for s in _SOURCES],
            build_directory=str(build), extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler / ninja
        log.warning("CPU kernels unavailable (%s); using torch ops", e)
    return _module
