"""pdserve's compiled CPU kernels (``csrc/``), built once into the cache.

Built with torch's C++ extension loader (ninja + the system compiler) the first
time they are needed and reused after; a machine without AVX2 or without a
compiler gets ``None`` and the engine falls back to plain torch ops.

The build directory is named by the sources' content and built from a copy of
them inside it, so every checkout of the same code (a Ray job's working-dir copy,
a container) shares one build instead of rebuilding over another's. A module built
before is imported directly: torch's loader would run ninja under a lock file on
every start, and a process killed meanwhile leaves that lock behind for every later
one to wait on forever (such a lock is removed once older than any real build).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_SOURCES = (
    "bindings.cpp",
    "bf16_gemv.cpp",
    "decode_ops.cpp",
    "int8_gemv.cpp",
)
_NAME = "pdserve_cpu_kernels"
_STALE_LOCK_S = 600.0
_module: Any = None
_tried = False


def load() -> Any:
    """The kernel module (``linear_bf16w[_packed]``, ``rms_norm``, ``rope_store_kv``,
    ``paged_decode_attention``, ``silu_mul``), or None where it cannot be built."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if not torch.cpu._is_avx2_supported():
        return None
    try:
        build, sources = _build_dir()
        built = build / f"{_NAME}.so"
        if built.exists():  # built before (make install): import it, no ninja run, no lock
            try:
                _module = _import(built)
                return _module
            except ImportError as e:  # half-written by a build running now: wait for it
                log.info("kernel module not importable yet (%s); building", e)
        from torch.utils.cpp_extension import load as load_extension

        # -fopenmp: at::parallel_for is a header template; without it the kernels
        # silently run on one thread.
        _module = load_extension(
            name=_NAME, sources=sources, build_directory=str(build),
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as e:  # no compiler / ninja
        log.warning("CPU kernels unavailable (%s); using torch ops", e)
    return _module


def _import(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_dir() -> tuple[Path, list[str]]:
    """(build directory for these sources, the sources' copies inside it)."""
    from pdserve.model_files import cache_root

    csrc = Path(__file__).with_name("csrc")
    digest = hashlib.sha256(b"".join((csrc / s).read_bytes() for s in _SOURCES)).hexdigest()
    build = cache_root() / "ext" / f"torch-{torch.__version__}-{digest[:12]}"
    src = build / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in _SOURCES:
        if not (src / name).exists():
            tmp = src / f".{name}.tmp"
            shutil.copyfile(csrc / name, tmp)
            tmp.replace(src / name)  # atomic: a racing process sees the whole file or none
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        log.warning("removing a stale kernel build lock %s", lock)
        lock.unlink(missing_ok=True)
    return build, [str(src / name) for name in _SOURCES]
