"""The wire check runs the real sender and receiver in two processes and reports
shares of the raw socket per encoding (figures themselves are for `pdserve bench`)."""

from __future__ import annotations

from bench.wire_bench import ENCODINGS, wire_throughput


def test_wire_check_moves_the_kv_through_both_processes() -> None:
    r = wire_throughput(repeats=1, total_mb=4, chunk_tokens=64)
    assert r["raw_socket_GBps"] > 0
    for enc in ENCODINGS:
        e = r[enc]
        assert 0 < e["wire_GBps"] < e["effective_GBps"]  # both encodings compress fp32
        assert e["effective_share_of_raw"] == e["effective_GBps"] / r["raw_socket_GBps"]
