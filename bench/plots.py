"""PNG plots of a `pdserve bench --target ...` run (matplotlib, Agg backend).

- ``<W>_ttft_cdf.png`` and ``<W>_itl_cdf.png``: latency CDFs, one line per target
  (for W4 the short requests, which carry the interference);
- ``W4_itl_timeline.png``: every short-request ITL gap at the time it ended, one
  panel per target, with the long-prompt arrivals marked as vertical lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import line


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _requests(res: dict[str, Any], w: str) -> list[dict[str, Any]]:
    reqs = [r for run in res["runs"] for r in run["requests"] if r["success"]]
    return [r for r in reqs if r["cls"] == "short"] if w == "W4" else reqs


def _titled(title: str, doc: dict[str, Any]) -> str:
    """Every plot names the machine it was measured on."""
    m = doc.get("machine")
    return f"{title}\n{line(m)}" if m and "flags" in m else title


def _cdf(ax: Any, values_ms: list[float], label: str) -> None:
    if not values_ms:
        return
    x = np.sort(np.asarray(values_ms))
    ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)


def latency_cdfs(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    workloads = dict.fromkeys(w for e in doc["targets"] for w in e["workloads"])
    paths = []
    for w in workloads:
        for metric, title in (("ttft", "TTFT"), ("itl", "inter-token latency")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for e in doc["targets"]:
                if w not in e["workloads"]:
                    continue
                reqs = _requests(e["workloads"][w], w)
                vals = ([1e3 * r["ttft_s"] for r in reqs] if metric == "ttft"
                        else [1e3 * g for r in reqs for g in r["itl_s"]])
                _cdf(ax, vals, e["label"])
            who = " (short requests)" if w == "W4" else ""
            ax.set(xlabel=f"{title} (ms)", ylabel="fraction of samples",
                   title=_titled(f"{w} {title} CDF{who}", doc), ylim=(0, 1.02))
            ax.set_xscale("log")  # queued TTFTs and prefill stalls span orders of magnitude
            ax.grid(alpha=0.3, which="both")
            ax.legend()
            path = out_dir / f"{w}_{metric}_cdf.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
    return paths


def w4_itl_timeline(doc: dict[str, Any], out_dir: Path) -> Path | None:
    entries = [e for e in doc["targets"] if "W4" in e["workloads"]]
    if not entries:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(entries), 1, figsize=(10, 1 + 3 * len(entries)), sharex=True,
                             squeeze=False, layout="constrained")
    for ax, e in zip(axes[:, 0], entries, strict=True):
        res = e["workloads"]["W4"]
        for t in res["long_arrivals_s"]:
            ax.axvline(t, color="tab:red", alpha=0.35, lw=1)
        xs = [t for r in _requests(res, "W4") for t in r["chunk_times_s"][1:]]
        # log scale: a zero gap (two events in one read) is drawn at 0.01 ms
        ys = [max(1e3 * g, 0.01) for r in _requests(res, "W4") for g in r["itl_s"]]
        ax.scatter(xs, ys, s=3, color="tab:blue", label="short-request ITL")
        ax.plot([], [], color="tab:red", alpha=0.5, label="long-prompt arrival")
        ax.set(ylabel="ITL (ms)", title=e["label"])
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time since the start of the run (s)")
    fig.suptitle(_titled("W4: short requests' inter-token latency over time", doc))
    path = out_dir / "W4_itl_timeline.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def draw(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = latency_cdfs(doc, out)
    timeline = w4_itl_timeline(doc, out)
    return paths + ([timeline] if timeline else [])
