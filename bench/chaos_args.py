"""The command line of ``pdserve bench --chaos`` and ``--soak`` (bench/chaos_bench.py),
kept apart so that ``pdserve bench --help`` does not import the chaos harness."""

from __future__ import annotations

import argparse

SOAK_DURATION_S = 1200.0  # --soak without --duration


def add_chaos_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("chaos and soak (a cluster of real processes)")
    g.add_argument("--chaos", action="store_true",
                   help="requests under kill -9, SIGSTOP, restarts, hostile peers, bad clients")
    g.add_argument("--soak", action="store_true",
                   help="--duration seconds (default 1200) at --rate; RSS and blocks")
    g.add_argument("--requests", type=int, default=1000, help="--chaos: how many requests")
    g.add_argument("--rate", type=float, default=None,
                   help="requests/s (--chaos default 4; --soak default 70%% of capacity)")
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    g.add_argument("--process-faults", type=int, default=None,
                   help="--chaos: kill -9 / SIGSTOP faults (default requests / 25)")
    g.add_argument("--decode-workers", type=int, default=2)
    g.add_argument("--deadline", type=float, default=60.0, help="each request's deadline (s)")
    g.add_argument("--sample-every", type=float, default=10.0, help="--soak: RSS sampling (s)")
    g.add_argument("--log-dir", default=None, help="every process's log (default: a temp dir)")
