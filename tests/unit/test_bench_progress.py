"""Progress of long `pdserve bench` runs: what each bar names and counts, on stderr
only, and `--quiet`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from bench.progress import RecordingProgress, RequestTally, make_progress
from bench.serving_bench import run_open_loop, w4_schedule
from bench.serving_client import Chunk, RequestSpec
from bench.serving_run import ServeBenchConfig, run
from pdserve.cli import main
from tests.serving_fakes import FakeGeneration, start_fake_grpc


class _EveryThirdFails:
    target = "fake://flaky"

    def __init__(self) -> None:
        self.n = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def stream(self, spec: RequestSpec) -> AsyncIterator[Chunk]:
        self.n += 1
        await asyncio.sleep(0.01)
        if self.n % 3 == 0:
            raise ConnectionError("reset")
        yield Chunk(True, tokens=1)


def test_open_loop_bar_counts_sent_completed_failed() -> None:
    sched = w4_schedule(40.0, 0.0, 0.5, vocab=100, seed=1)
    progress = RecordingProgress()
    bar = progress.bar("W4", len(sched), expected_s=0.5)
    tally = RequestTally(bar)
    records, _ = asyncio.run(run_open_loop(_EveryThirdFails(), sched, tally))
    failed = sum(not r.success for r in records)
    assert 0 < failed < len(sched)
    assert tally.sent == len(sched) and tally.completed + tally.failed == len(sched)
    assert bar.counts == {"sent": len(sched), "completed": len(sched) - failed,  # type: ignore[attr-defined]
                          "failed": failed}
    assert bar.done == len(sched)  # type: ignore[attr-defined]


def test_served_w2_w4_name_target_workload_repeat_and_finish_every_bar() -> None:
    server, port = start_fake_grpc(FakeGeneration(0.002, 0.0005))
    progress = RecordingProgress()
    try:
        doc = run([("pd", f"grpc://127.0.0.1:{port}")],
                  ServeBenchConfig(workloads=("W2", "W4"), repeats=2, duration_s=0.5,
                                   rate_short=8.0, prefill_capacity=10240.0), progress)
    finally:
        server.stop(0)
    w2, unloaded, w4 = progress.bars
    assert w2.what == "pd W2" and w2.shown == ["pd W2 repeat 1/2", "pd W2 repeat 2/2"]
    assert w2.total == w2.done == 2 and w2.counts["failed"] == 0
    assert unloaded.what.startswith("pd W4 unloaded") and unloaded.done == 3
    n = len(doc["targets"][0]["workloads"]["W4"]["runs"][0]["requests"])
    assert w4.what.startswith("pd W4 open loop") and w4.expected_s == 0.5
    assert w4.total == w4.done == n and w4.counts == {"sent": n, "completed": n, "failed": 0}
    assert all(b.closed for b in progress.bars)


def test_bars_go_to_stderr_and_quiet_turns_them_off(capsys: pytest.CaptureFixture[str]) -> None:
    server, port = start_fake_grpc(FakeGeneration(0.002, 0.0005))
    argv = ["bench", "--target", f"grpc://127.0.0.1:{port}", "--label", "pd",
            "--workload", "W2", "--repeats", "1"]
    try:
        assert main(argv) == 0
        shown = capsys.readouterr()
        assert main([*argv, "--quiet"]) == 0
        quiet = capsys.readouterr()
    finally:
        server.stop(0)
    assert "pd W2 repeat 1/1" in shown.err and "1/1" in shown.err
    assert "repeat" not in quiet.err and quiet.err.strip() == ""
    assert "repeat" not in shown.out  # the table is the same with or without bars
    assert shown.out.splitlines()[0] == quiet.out.splitlines()[0]


def test_unknown_progress_name_is_refused() -> None:
    with pytest.raises(ValueError, match="quiet"):
        make_progress("fancy")
