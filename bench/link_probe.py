"""The slow-link bench's instruments (bench/slow_link.sh).

``--netns NS --listen IP``: the link's ceiling, measured: a sender in network
namespace NS listens on IP and streams ``PROBE_BYTES`` over one TCP connection; this
process receives them and prints MB/s. ``--annotate JSON``: writes the link (tbf rate and
measured ceiling) into a ``pdserve bench`` result and prints, per target, the TTFTs, the
plans, the KV bytes per prompt token (which wire encoding the remote prompts took) and
the share of the link's ceiling its KV used.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROBE_BYTES = 32 * 2**20
PORT = 50999
_SENDER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
c, _ = s.accept(); buf = b"\\0" * 2**16; left = int(sys.argv[3])
while left > 0:
    c.sendall(buf[:left]); left -= len(buf)
c.close()
"""


def measure(netns: str, listen: str, python: str) -> float:
    """MB/s of one TCP stream from ``listen`` inside ``netns`` to here."""
    sender = subprocess.Popen(["ip", "netns", "exec", netns, python, "-c", _SENDER, listen,
                               str(PORT), str(PROBE_BYTES)])
    try:
        conn = _connect(listen, PORT)
        t0, got = time.perf_counter(), 0
        while chunk := conn.recv(2**20):
            got += len(chunk)
        elapsed = time.perf_counter() - t0
        conn.close()
    finally:
        sender.wait(timeout=60)
    return got / elapsed / 1e6


def _connect(host: str, port: int, timeout_s: float = 30.0) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout_s)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def annotate(path: Path, mbit: float, measured_mb_s: float) -> list[str]:
    """Add the link to the result at ``path``; return one line per target."""
    doc = json.loads(path.read_text())
    doc["link"] = {"tbf_mbit": mbit, "measured_mb_s": measured_mb_s}
    path.write_text(json.dumps(doc, indent=1))
    lines = ["target            short TTFT p50/p99 ms   long TTFT p50/p99 ms   plans"
             "                 KV B/token      link use"]
    for t in doc["targets"]:
        w4 = t["workloads"]["W4"]["summary"]
        lines.append(f"{t['label']:<17} {_ttft(w4['short']):<23} {_ttft(w4['long']):<22} "
                     f"{_plans(w4['all']):<21} {_kv(w4['all'], measured_mb_s)}")
    return lines


def _ttft(s: dict[str, Any]) -> str:
    t = s["ttft_ms"]
    if t["p50"] is None:
        return f"none of {s['completed'] + s['failed']}"
    failed = f" ({s['failed']} failed)" if s["failed"] else ""
    return f"{t['p50']:,.0f} / {t['p99']:,.0f}{failed}"


def _plans(s: dict[str, Any]) -> str:
    return " ".join(f"{k} {v}" for k, v in s.get("plans", {}).items())


def _kv(s: dict[str, Any], ceiling_mb_s: float) -> str:
    kv = s.get("kv")
    if not kv:
        return "-"
    use = kv["bytes"] / s["duration_s"] / 1e6 / ceiling_mb_s
    return (f"{kv['bytes_per_token_min']:,.0f}-{kv['bytes_per_token_max']:,.0f}"
            f"{'':<6}{100 * use:.0f}%")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--netns")
    p.add_argument("--listen")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--annotate", type=Path)
    p.add_argument("--mbit", type=float)
    p.add_argument("--measured", type=float)
    a = p.parse_args(argv)
    if a.annotate:
        print("\n".join(annotate(a.annotate, a.mbit, a.measured)))
    else:
        print(f"{measure(a.netns, a.listen, a.python):.2f}")


if __name__ == "__main__":
    main()
