"""``kernels=auto``: per op, ours or torch's, whichever is faster on this machine.

Each op is timed once at the shapes the loaded model uses (batch 1 and a small
batch, a few ms in all) and the choice is cached as JSON next to the built kernels
(that directory is keyed by the sources and ISA level), in a file keyed by the CPU's
model and flags. A later process on the same CPU reads the choice back without
timing. Each choice is logged once per process. The key includes torch's thread
count: what wins on one thread need not win on sixteen.

Lifecycle of one op key (kernel name + shapes + threads)::

    unknown --in the JSON file--> chosen (read back, no timing)
    unknown --timed once--------> chosen (written to the JSON file)
    chosen: "cpu" (our kernel) or "torch"; logged once per process
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pdserve.engine import cpu_kernels
from pdserve.engine.cpu_features import detect

log = logging.getLogger(__name__)

Work = Callable[[], object]
_BUDGET_S = 0.002  # per timed callable, after one warm-up call
_MIN_REPS, _MAX_REPS = 3, 50


class ChoiceCache:
    """op key -> "cpu" | "torch", mirrored to a JSON file when there is one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._choices = self._read()

    def get(self, key: str) -> str | None:
        return self._choices.get(key)

    def put(self, key: str, choice: str) -> None:
        self._choices[key] = choice
        if self.path is None:
            return
        merged = {**self._read(), key: choice}  # keep what another process added meanwhile
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")  # one per process
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def _read(self) -> dict[str, str]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable: time again and overwrite
        return {k: v for k, v in data.items() if v in ("cpu", "torch")}


_cache: ChoiceCache | None = None
_logged: set[str] = set()


def cache() -> ChoiceCache:
    global _cache
    if _cache is None:
        build = cpu_kernels.loaded_build_dir()
        path = None if build is None else build / f"choices-{detect().key()}.json"
        _cache = ChoiceCache(path)
    return _cache


def use_cache(replacement: ChoiceCache | None) -> None:
    """Tests: read and write choices elsewhere (None: the default file again)."""
    global _cache
    _cache = replacement
    _logged.clear()


def prefer_ours(op: str, ours: Sequence[Work], theirs: Sequence[Work]) -> bool:
    """Whether our kernel runs ``op`` (its name and shapes): ``ours`` and ``theirs``
    do the same work items (e.g. batch 1 and batch 4) through each implementation."""
    key = f"{op} threads={torch.get_num_threads()}"
    choice = cache().get(key)
    if choice is None:
        t_ours, t_torch = sum(map(_seconds, ours)), sum(map(_seconds, theirs))
        choice = "cpu" if t_ours <= t_torch else "torch"
        cache().put(key, choice)
        log.info("kernels=auto: %s runs %s (ours %.1f us, torch %.1f us)",
                 key, choice, t_ours * 1e6, t_torch * 1e6)
    elif key not in _logged:
        log.info("kernels=auto: %s runs %s (cached choice)", key, choice)
    _logged.add(key)
    return choice == "cpu"


def _seconds(work: Work) -> float:
    """Fastest of a few runs: the least disturbed by the rest of the machine."""
    work()  # warm-up: first-touch allocations, lazy init
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < _MIN_REPS or (reps < _MAX_REPS and time.perf_counter() - start < _BUDGET_S):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best
