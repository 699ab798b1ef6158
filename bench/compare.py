"""``pdserve bench --compare A.json B.json``: two runs side by side.

Reads the JSON any ``pdserve bench`` mode writes (``--engine``: ``report`` +
``raw``; ``--target``: ``targets``; W5: ``W5``), pairs the figures both runs have
(same backend or target label and workload; two single-target runs pair whatever
their labels), and prints each as A, B and B/A, each with the spread of its
repeats: ``[min-max]`` of the per-repeat figures, and for B/A the range that the
two spreads allow (``min B / max A`` to ``max B / min A``). A B/A range that
excludes 1 is marked: the change is larger than the repeats' scatter. One run
(W4, or ``--repeats 1``) has no spread; its B/A is shown unmarked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.workloads import figures

# Served figures worth comparing: (summary path, name in the table). None = not reported.
SERVED_FIGURES = (
    (("output_throughput",), "output_tok_s"), (("request_throughput",), "req_s"),
    (("decode_tok_s",), "decode_tok_s"), (("prefill_tok_s",), "prefill_tok_s"),
    (("goodput",), "goodput_req_s"),
    (("ttft_ms", "p50"), "ttft_p50_ms"), (("ttft_ms", "p99"), "ttft_p99_ms"),
    (("tpot_ms", "p50"), "tpot_p50_ms"), (("itl_ms", "p50"), "itl_p50_ms"),
    (("itl_ms", "p99"), "itl_p99_ms"), (("e2e_ms", "p50"), "e2e_p50_ms"),
)
W4_CLASSES = ("short", "long", "all")


@dataclass(frozen=True)
class Figure:
    value: float
    """What the run reported (the median of its repeats)."""
    repeats: tuple[float, ...]

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.repeats), max(self.repeats)) if self.repeats else (self.value,) * 2


Figures = dict[str, Figure]


def load(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--compare: cannot read {path}: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"--compare: {path} is not a pdserve bench JSON")
    return doc


def kind_of(doc: dict[str, Any], path: str) -> str:
    for kind, key in (("engine", "report"), ("served", "targets"), ("W5", "W5")):
        if key in doc:
            return kind
    raise ValueError(f"--compare: {path} is not the JSON of pdserve bench --engine, --target "
                     "or --workload W5")


def engine_figures(doc: dict[str, Any]) -> dict[str, Figures]:
    """Per backend: 'W2 decode_tok_s' -> the report's value and one figure per repeat."""
    out: dict[str, Figures] = {}
    for backend, res in doc["raw"].items():
        times = {r["name"]: r["times_s"] for r in res["runs"]}
        figs: Figures = {}
        for w, row in doc["report"].items():
            mine = {n: t for n, t in times.items() if n.startswith(w)}
            if backend not in row or not mine:
                continue
            n = min(len(t) for t in mine.values())
            per_repeat = [figures(w, {k: [t[i]] for k, t in mine.items()}) for i in range(n)]
            for key, value in row[backend].items():
                figs[f"{w} {key}"] = Figure(value, tuple(f[key] for f in per_repeat))
        out[backend] = figs
    return out


def _at(summary: dict[str, Any], path: tuple[str, ...]) -> float | None:
    v: Any = summary
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _served_workload(w: str, res: dict[str, Any]) -> Iterator[tuple[str, Figure]]:
    groups = ([(c, res["summary"][c], []) for c in W4_CLASSES if c in res["summary"]]
              if w == "W4" else
              [("", res["summary"], [r["summary"] for r in res["runs"] if "summary" in r])])
    for cls, summary, runs in groups:
        for path, name in SERVED_FIGURES:
            value = _at(summary, path)
            if value is None:
                continue
            repeats = tuple(v for v in (_at(r, path) for r in runs) if v is not None)
            yield f"{w} {cls + ' ' if cls else ''}{name}", Figure(value, repeats or (value,))


def served_figures(doc: dict[str, Any]) -> dict[str, Figures]:
    return {t["label"]: {k: f for w, res in t["workloads"].items()
                         for k, f in _served_workload(w, res)} for t in doc["targets"]}


def w5_figures(doc: dict[str, Any]) -> dict[str, Figures]:
    res = doc["W5"]
    figs: Figures = {}
    for r in res["requests"]:
        where = f"W5 {r['encoding']} {r['prompt_tokens']}"
        figs[f"{where} ttft_ms"] = Figure(1e3 * r["ttft_s"], (1e3 * r["ttft_s"],))
        figs[f"{where} exposed_ms"] = Figure(1e3 * r["exposed_s"], (1e3 * r["exposed_s"],))
    wire, rounds = res["wire"], res["wire"].get("rounds", [])
    figs["wire raw_socket_GBps"] = Figure(
        wire["raw_socket_GBps"], tuple(r["raw_socket_GBps"] for r in rounds))
    for enc in ("bf16", "int8"):
        for key in ("wire_GBps", "effective_GBps"):
            if enc in wire:
                figs[f"wire {enc} {key}"] = Figure(
                    wire[enc][key], tuple(r[enc][key] for r in rounds if enc in r))
    return {"pdserve": figs}


EXTRACT = {"engine": engine_figures, "served": served_figures, "W5": w5_figures}


def pairs(a: dict[str, Figures], b: dict[str, Figures]) -> list[tuple[str, Figures, Figures]]:
    """(name, A's, B's) for every backend/target both runs have."""
    common = [k for k in a if k in b]
    if not common and len(a) == 1 and len(b) == 1:
        (ka, fa), (kb, fb) = next(iter(a.items())), next(iter(b.items()))
        return [(f"{ka} -> {kb}", fa, fb)]
    if not common:
        raise ValueError(f"--compare: no backend or target in both runs (A: {sorted(a)}, "
                         f"B: {sorted(b)})")
    return [(k, a[k], b[k]) for k in common]


def ratio_range(a: Figure, b: Figure) -> tuple[float, float] | None:
    (a_lo, a_hi), (b_lo, b_hi) = a.spread, b.spread
    if a_lo <= 0 or a_hi <= 0:
        return None
    return b_lo / a_hi, b_hi / a_lo


def _cell(f: Figure) -> str:
    lo, hi = f.spread
    spread = f" [{lo:.4g}-{hi:.4g}]" if len(f.repeats) > 1 else ""
    return f"{f.value:.4g}{spread} n={len(f.repeats)}"


def rows(a: Figures, b: Figures) -> list[tuple[str, str, str, str]]:
    """(figure, A, B, B/A) for every figure both have."""
    out = []
    for key in (k for k in a if k in b):
        fa, fb = a[key], b[key]
        if fa.value == 0:
            ratio = "n/a"
        else:
            ratio = f"{fb.value / fa.value:.3f}"
            rr = ratio_range(fa, fb)
            if rr is not None and (len(fa.repeats) > 1 or len(fb.repeats) > 1):
                ratio += f" [{rr[0]:.3f}-{rr[1]:.3f}]" + (" *" if rr[0] > 1 or rr[1] < 1 else "")
        out.append((key, _cell(fa), _cell(fb), ratio))
    return out


def _machine(m: dict[str, Any]) -> str:
    from bench.machine import line

    try:
        return line(m)
    except KeyError:  # JSON from before the machine was described in full
        return ", ".join(f"{k} {v}" for k, v in m.items() if not isinstance(v, dict | list))


def render(path_a: str, doc_a: dict[str, Any], path_b: str, doc_b: dict[str, Any]) -> str:
    kind = kind_of(doc_a, path_a)
    if kind_of(doc_b, path_b) != kind:
        raise ValueError(f"--compare: {path_a} and {path_b} come from different pdserve bench "
                         "modes")
    lines = [f"pdserve bench --compare  A = {path_a}  B = {path_b}",
             "each figure: the run's value [min-max of its repeats] n=repeats; B/A [the range "
             "the spreads allow]; * = the range excludes 1 (a change beyond the scatter)"]
    for tag, doc in (("A", doc_a), ("B", doc_b)):
        if isinstance(doc.get("machine"), dict):
            lines.append(f"machine {tag}: {_machine(doc['machine'])}")
    for name, fa, fb in pairs(EXTRACT[kind](doc_a), EXTRACT[kind](doc_b)):
        table = rows(fa, fb)
        if not table:
            continue
        width = [max(len(r[i]) for r in table) for i in range(3)]
        lines.append(f"\n{name}")
        lines.append(f"  {'figure':<{width[0]}}  {'A':<{width[1]}}  {'B':<{width[2]}}  B/A")
        lines += [f"  {k:<{width[0]}}  {va:<{width[1]}}  {vb:<{width[2]}}  {r}"
                  for k, va, vb, r in table]
    return "\n".join(lines)


def compare_files(path_a: str, path_b: str) -> int:
    print(render(path_a, load(path_a), path_b, load(path_b)))
    return 0
