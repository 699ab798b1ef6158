"""Which launchers ``pdserve up`` can use: the ``pdserve.launchers`` entry points.

A launcher is ``up(config: ClusterConfig) -> int`` (the exit status once the
cluster is stopped). pyproject.toml registers them::

    [project.entry-points."pdserve.launchers"]
    process = "pdserve.process_launcher:up"
    ray = "deploy.ray.launcher:up"

so pdserve finds the Ray launcher by name, never by importing deploy/ (``make
install`` reinstalls whenever pyproject.toml changes, so the metadata is current).
A launcher's module may ship a cluster config (``PACKAGED_CONFIG``, a path), the
one ``pdserve up --address`` runs when given no ``--config``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdserve.cluster_config import ClusterConfig

GROUP = "pdserve.launchers"
Launcher = Callable[["ClusterConfig"], int]


@functools.cache
def registered() -> tuple[metadata.EntryPoint, ...]:
    return tuple(metadata.entry_points(group=GROUP))


def _by_name(entry_points: Iterable[metadata.EntryPoint] | None) -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in (registered() if entry_points is None else entry_points)}


def names(entry_points: Iterable[metadata.EntryPoint] | None = None) -> tuple[str, ...]:
    return tuple(sorted(_by_name(entry_points)))


def find(name: str, entry_points: Iterable[metadata.EntryPoint] | None = None) -> Launcher:
    """The launcher called ``name``; ValueError naming the known ones otherwise."""
    found = _by_name(entry_points)
    if name not in found:
        raise ValueError(f"launcher must be one of {tuple(sorted(found))}, got {name!r}")
    launcher: Launcher = found[name].load()
    return launcher


def packaged_config(name: str, entry_points: Iterable[metadata.EntryPoint] | None = None,
                    ) -> str | None:
    """The cluster config launcher ``name`` ships, if any."""
    found = _by_name(entry_points)
    if name not in found:
        raise ValueError(f"launcher must be one of {tuple(sorted(found))}, got {name!r}")
    path = getattr(importlib.import_module(found[name].module), "PACKAGED_CONFIG", None)
    return None if path is None else str(path)
