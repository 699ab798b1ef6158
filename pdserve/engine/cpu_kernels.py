"""pdserve's compiled CPU kernels (``csrc/``), built once per CPU level into the cache.

Built with torch's C++ extension loader (ninja + the system compiler) the first
time they are needed and reused after; a CPU below AVX2 or a machine without a
compiler gets ``None`` and the engine falls back to plain torch ops.

The module is compiled for this CPU's ISA level (cpu_features: AVX2+FMA, or AVX-512
with VNNI, and BF16 where present) with exactly that level's flags (never
``-march=native``, which would let the compiler use instructions the level's record
does not name). The build directory is named by torch's version, the ISA level and
the sources' content, and records the level in a file: a module whose recorded level
this CPU lacks (a cache or image copied from a newer CPU) is never imported. Where
this CPU's level cannot be built (no compiler in an image), a build of the same
sources for a lower level this CPU has is used; failing that, torch.

The directory holds a copy of the sources, so every checkout of the same code (a Ray
job's working-dir copy, a container) shares one build instead of rebuilding over
another's. A module built before is imported directly: torch's loader would run
ninja under a lock file on every start, and a process killed meanwhile leaves that
lock behind for every later one to wait on forever (such a lock is removed once
older than any real build).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pdserve.engine.cpu_features import ISA_LEVELS, CpuFeatures, IsaLevel, detect, isa_level

log = logging.getLogger(__name__)

_SOURCES = (  # one entry per line
    "bindings.cpp",
    "bf16_gemv.cpp",
    "decode_ops.cpp",
    "decode_layer.cpp",
    "int8_gemv.cpp",
    "prefill_attention.cpp",
    "wide_ops.cpp",
)
_HEADERS = ("simd_math.h",)  # included by the sources: copied and digested with them
_NAME = "pdserve_cpu_kernels"
_ISA_RECORD = "isa"
_STALE_LOCK_S = 600.0
_module: Any = None
_module_dir: Path | None = None
_tried = False


class IsaMismatch(ImportError):
    """A built module needs instructions this CPU does not have."""


def load() -> Any:
    """The kernel module (``linear_bf16w[_packed]``, ``rms_norm``, ``rope_store_kv``,
    ``paged_decode_attention``, ``silu_mul``, ``compiled_isa``), or None where it
    cannot be built or imported on this CPU. Unchecked: see kernel_check.verified()."""
    global _module, _module_dir, _tried
    if _tried:
        return _module
    _tried = True
    features = detect()
    level = features.best_level()
    if level is None:
        log.info("CPU kernels need AVX2+FMA; %s has neither: using torch ops", features.model)
        return None
    try:
        _module, _module_dir = _load_for(level, features), build_dir(level)[0]
    except Exception as e:  # no compiler / ninja, or a record this CPU lacks
        lower = _built_for_lower_level(level, features)
        if lower is None:
            log.warning("CPU kernels unavailable (%s); using torch ops", e)
        else:
            log.warning("CPU kernels for %s unavailable (%s); using the %s build",
                        level.name, e, lower[1].name)
            _module, _module_dir = lower
    return _module


def _built_for_lower_level(level: IsaLevel, features: CpuFeatures) -> tuple[Any, Path] | None:
    """A module of these sources built before for a lower level this CPU has (an
    image baked on an AVX2 machine, run on an AVX-512 one without a compiler)."""
    from pdserve.model_files import cache_root

    for lower in reversed(ISA_LEVELS[: ISA_LEVELS.index(level)]):
        build = cache_root() / "ext" / build_key(lower)
        if (build / f"{_NAME}.so").exists():
            try:
                return import_built(build, features), build
            except ImportError:
                continue
    return None


def _load_for(level: IsaLevel, features: CpuFeatures) -> Any:
    build, sources = build_dir(level)
    if (build / f"{_NAME}.so").exists():  # built before (make install): no ninja, no lock
        try:
            return import_built(build, features)
        except IsaMismatch:
            raise
        except ImportError as e:  # half-written by a build running now: wait for it
            log.info("kernel module not importable yet (%s); building", e)
    from torch.utils.cpp_extension import load as load_extension

    # -fopenmp: at::parallel_for is a header template; without it the kernels
    # silently run on one thread.
    log.info("building CPU kernels for %s into %s", level.name, build)
    return load_extension(
        name=_NAME, sources=sources, build_directory=str(build),
        extra_cflags=["-O3", *level.cflags, "-fopenmp"], extra_ldflags=["-fopenmp"],
        verbose=False)


def import_built(build: Path, features: CpuFeatures) -> Any:
    """Import the module built in ``build`` if this CPU has the level it records."""
    record = build / _ISA_RECORD
    recorded = record.read_text().strip() if record.exists() else "unrecorded"
    if recorded == "unrecorded" or not features.has(isa_level(recorded)):
        raise IsaMismatch(f"{build.name} was built for {recorded}; "
                          f"this CPU ({features.model}) lacks it")
    return _import(build / f"{_NAME}.so")


def _import(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_key(level: IsaLevel) -> str:
    """Directory name: torch version, ISA level, sources' digest."""
    csrc = Path(__file__).with_name("csrc")
    files = _SOURCES + _HEADERS
    digest = hashlib.sha256(b"".join((csrc / s).read_bytes() for s in files)).hexdigest()
    return f"torch-{torch.__version__}-{level.name}-{digest[:12]}"


def build_dir(level: IsaLevel) -> tuple[Path, list[str]]:
    """(build directory for these sources at ``level``, the sources' copies inside it)."""
    from pdserve.model_files import cache_root

    csrc = Path(__file__).with_name("csrc")
    build = cache_root() / "ext" / build_key(level)
    src = build / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in _SOURCES + _HEADERS:
        if not (src / name).exists():
            _write_atomic(src / name, (csrc / name).read_bytes())
    if not (build / _ISA_RECORD).exists():
        _write_atomic(build / _ISA_RECORD, level.name.encode())
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        log.warning("removing a stale kernel build lock %s", lock)
        lock.unlink(missing_ok=True)
    return build, [str(src / name) for name in _SOURCES]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # a racing process sees the whole file or none


def loaded_build_dir() -> Path | None:
    """Where the loaded module lives (per-CPU caches go next to it), if one is loaded."""
    load()
    return _module_dir
