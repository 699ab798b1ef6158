"""The printed table of `pdserve bench --target ...` and its headline lines."""

from __future__ import annotations

from typing import Any

W6_NOTE = ("W6: pdserve's engine has no speculative decoding yet, so this is decode speed "
           "without speculation; the with/without n-gram speculation comparison (and the "
           "identical-outputs check) is left to the engine issue.")

HEADER = (f"{'wl':<3} {'target':<14} {'class':<6} {'ok':>4} {'fail':>4} "
          f"{'TTFT p50/p90/p99 ms':>23} {'TPOT p50 ms':>11} {'ITL p50/p99/max ms':>22} "
          f"{'E2E p50 ms':>10} {'out tok/s':>9} {'req/s':>6} {'goodput':>7}")


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def row(w: str, label: str, cls: str, s: dict[str, Any]) -> str:
    t, i = s["ttft_ms"], s["itl_ms"]
    ttft = f"{_f(t['p50'])}/{_f(t['p90'])}/{_f(t['p99'])}"
    itl = f"{_f(i['p50'])}/{_f(i['p99'])}/{_f(i['max'])}"
    return (f"{w:<3} {label[:14]:<14} {cls:<6} {s['completed']:>4} {s['failed']:>4} "
            f"{ttft:>23} {_f(s['tpot_ms']['p50']):>11} {itl:>22} {_f(s['e2e_ms']['p50']):>10} "
            f"{_f(s['output_throughput']):>9} {_f(s['request_throughput'], 2):>6} "
            f"{_f(s['goodput'], 2):>7}")


def table(doc: dict[str, Any]) -> list[str]:
    lines = [HEADER]
    for entry in doc["targets"]:
        for w, res in entry["workloads"].items():
            if w == "W4":
                lines += [row(w, entry["label"], c, res["summary"][c])
                          for c in ("short", "long", "all")]
            else:
                lines.append(row(w, entry["label"], "-", res["summary"]))
    return lines


def headlines(doc: dict[str, Any]) -> list[str]:
    by_w: dict[str, list[str]] = {}
    for entry in doc["targets"]:
        label = entry["label"]
        for w, res in entry["workloads"].items():
            s = res["summary"]
            if w == "W1":
                cell = f"{label} {_f(s['output_throughput'])} out tok/s"
            elif w == "W2":
                cell = (f"{label} {_f(s['decode_tok_s'])} decode tok/s, "
                        f"TTFT {_f(s['ttft_ms']['p50'], 0)} ms")
            elif w == "W3":
                cell = (f"{label} {_f(s.get('prefill_tok_s'), 0)} prefill tok/s, "
                        f"TTFT {_f(s['ttft_ms']['p50'], 0)} ms")
            elif w == "W4":
                sh = s["short"]
                cell = (f"{label} short ITL p50/p99/max {_f(sh['itl_ms']['p50'])}/"
                        f"{_f(sh['itl_ms']['p99'])}/{_f(sh['itl_ms']['max'])} ms, "
                        f"TTFT p50/p99 "
                        f"{_f(sh['ttft_ms']['p50'])}/{_f(sh['ttft_ms']['p99'])} ms, goodput "
                        f"{_f(sh['goodput'], 2)}/s (SLO TTFT {1e3 * res['slo']['ttft_s']:.0f} ms,"
                        f" TPOT {1e3 * res['slo']['tpot_s']:.1f} ms)")
            else:
                cell = (f"{label} {_f(s['output_throughput'])} out tok/s, per request "
                        f"{_f(s['decode_tok_s'])} decode tok/s")
            by_w.setdefault(w, []).append(cell)
    lines = [f"{w}: " + "; ".join(cells) for w, cells in by_w.items()]
    if "W6" in by_w:
        lines.append(W6_NOTE)
    return lines


def render(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    names = ", ".join(f"{e['label']}={e['target']}" for e in doc["targets"])
    head = [f"pdserve bench against servers: {names}",
            f"W1-W3/W6: median of {cfg['repeats']} runs; W4: one open-loop run of "
            f"{cfg['duration_s']:.0f} s; greedy, ignore_eos, token-id prompts"]
    rates = cfg.get("w4_rates")
    if rates:
        head.append(f"W4 rates: short {cfg['rate_short']:.3f}/s, long {rates['rate_long']:.3f}/s "
                    f"= {rates['long_share']:.0%} of {rates['prefill_capacity_tok_s']:.0f} prefill "
                    f"tok/s (from {rates['measured_on']})")
    elif cfg.get("rate_long") is not None:
        head.append(f"W4 rates: short {cfg['rate_short']:.3f}/s, long {cfg['rate_long']:.3f}/s")
    return "\n".join(head + table(doc) + [""] + headlines(doc))
