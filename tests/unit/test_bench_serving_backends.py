"""The two `pdserve bench` target backends against in-process fake servers with
known tokens and delays, and one whole `pdserve bench --target ... --target ...`
invocation writing JSON and plots."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.serving_client import Backend, GrpcBackend, OpenAIBackend, RequestSpec, measure
from bench.stats import RequestRecord
from pdserve.cli import main
from tests.serving_fakes import FakeGeneration, FakeOpenAI, start_fake_grpc

FIRST, GAP = 0.10, 0.05
SPEC = RequestSpec("req-1", "t", [5, 6, 7], 5)


def _measure(backend: Backend, spec: RequestSpec = SPEC) -> RequestRecord:
    async def go() -> RequestRecord:
        await backend.start()
        try:
            return await asyncio.wait_for(measure(backend, spec, 0.0), 30)
        finally:
            await backend.close()

    return asyncio.run(go())


def _check_timing(rec: RequestRecord, gaps: int) -> None:
    assert rec.success, rec.error
    assert FIRST <= rec.ttft_s < FIRST + 0.3
    assert len(rec.itl_s) == gaps
    # Cumulative arrival times, not single gaps: a late message on a loaded box
    # shortens the gap after it, but none can arrive before the server sent it.
    arrivals = [rec.ttft_s + sum(rec.itl_s[:i + 1]) for i in range(gaps)]
    assert all(FIRST + (i + 1) * GAP * 0.9 <= t < FIRST + (i + 1) * GAP + 0.3
               for i, t in enumerate(arrivals))
    assert rec.e2e_s == pytest.approx(rec.ttft_s + sum(rec.itl_s))


def test_openai_backend_streams_token_ids_and_times_every_chunk() -> None:
    with FakeOpenAI(FIRST, GAP) as fake:
        rec = _measure(OpenAIBackend(f"http://127.0.0.1:{fake.port}/v1"))
    _check_timing(rec, gaps=4)
    assert rec.output_tokens == 5
    body = fake.payloads[0]
    assert body["model"] == "fake-model"  # from GET /v1/models
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 5
    assert body["ignore_eos"] is True and body["temperature"] == 0 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_openai_chunk_with_several_tokens_is_one_itl_gap_as_in_vllm() -> None:
    with FakeOpenAI(FIRST, GAP, per_chunk=2) as fake:
        rec = _measure(OpenAIBackend(f"http://127.0.0.1:{fake.port}/v1", model="m"))
    _check_timing(rec, gaps=2)  # chunks of 2, 2, 1 tokens
    assert rec.output_tokens == 5  # from usage, not from the chunk count
    assert fake.payloads[0]["model"] == "m"


def test_openai_http_error_is_a_failed_request() -> None:
    with FakeOpenAI() as fake:
        rec = _measure(OpenAIBackend(f"http://127.0.0.1:{fake.port}/v2", model="m"))
    assert not rec.success and "HTTP 404" in rec.error


@pytest.mark.parametrize("per_chunk,gaps", [(1, 4), (2, 2)])
def test_grpc_backend_streams_token_ids_and_times_every_message(per_chunk: int,
                                                                gaps: int) -> None:
    servicer = FakeGeneration(FIRST, GAP, per_chunk)
    server, port = start_fake_grpc(servicer)
    try:
        rec = _measure(GrpcBackend(f"grpc://127.0.0.1:{port}"))
    finally:
        server.stop(0)
    _check_timing(rec, gaps)
    assert rec.output_tokens == 5
    req = servicer.requests[0]
    assert list(req.token_ids.ids) == [5, 6, 7] and req.request_id == "req-1"
    assert req.params.ignore_eos and req.params.temperature == 0 and req.params.max_tokens == 5


def test_bench_two_targets_in_one_run_writes_json_and_plots(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, port = start_fake_grpc(FakeGeneration(0.002, 0.0005))
    out, plots = tmp_path / "serve.json", tmp_path / "plots"
    try:
        with FakeOpenAI(0.002, 0.0005) as fake:
            rc = main(["bench", "--target", f"grpc://127.0.0.1:{port}", "--label", "pd",
                       "--target", f"http://127.0.0.1:{fake.port}/v1", "--label", "oai",
                       "--workload", "W2", "--workload", "W4", "--repeats", "2",
                       "--duration", "1.5", "--rate-short", "4", "--prefill-capacity", "10240",
                       "--json", str(out), "--plot-dir", str(plots)])
    finally:
        server.stop(0)
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [t["label"] for t in doc["targets"]] == ["pd", "oai"]
    assert doc["config"]["w4_rates"]["rate_long"] == pytest.approx(2.0)  # 0.4 * 10240 / 2048
    for t in doc["targets"]:
        w2 = t["workloads"]["W2"]
        assert len(w2["runs"]) == 2 and w2["summary"]["completed"] == 1
        assert w2["summary"]["output_tokens"] == 256 and w2["summary"]["decode_tok_s"] > 0
        assert len(w2["runs"][0]["requests"][0]["itl_s"]) == 255
        w4 = t["workloads"]["W4"]
        assert w4["slo"]["ttft_s"] == pytest.approx(5e-3 * w4["unloaded"]["ttft_ms"])
        assert w4["summary"]["short"]["completed"] > 0 and w4["summary"]["short"]["failed"] == 0
        assert w4["summary"]["short"]["goodput"] is not None
        assert len(w4["long_arrivals_s"]) == w4["summary"]["long"]["completed"]
    names = {p.name for p in plots.iterdir()}
    assert {"W2_ttft_cdf.png", "W4_itl_cdf.png", "W4_itl_timeline.png"} <= names
    printed = capsys.readouterr().out
    assert "W4: pd short ITL p50/p99/max" in printed and "W2: pd " in printed


def test_bench_target_rejects_bad_arguments() -> None:
    assert main(["bench", "--target", "ftp://x"]) == 2
    assert main(["bench", "--target", "grpc://a:1", "--label", "a", "--label", "b"]) == 2
    assert main(["bench", "--target", "grpc://a:1", "--workload", "W5"]) == 2


def test_w4_without_rates_measures_prefill_capacity_on_the_first_target() -> None:
    from bench.serving_run import ServeBenchConfig, run

    server, port = start_fake_grpc(FakeGeneration(0.02, 0.0005))  # W3 TTFT ~20 ms
    try:
        doc = run([("pd", f"grpc://127.0.0.1:{port}")],
                  ServeBenchConfig(workloads=("W4",), duration_s=0.5, rate_short=4.0))
    finally:
        server.stop(0)
    rates = doc["config"]["w4_rates"]
    assert rates["measured_on"] == "pd"
    assert 2048 / 0.5 < rates["prefill_capacity_tok_s"] <= 2048 / 0.02
    assert rates["rate_long"] == pytest.approx(0.4 * rates["prefill_capacity_tok_s"] / 2048)
    assert doc["targets"][0]["workloads"]["W4"]["rates"]["long"] == rates["rate_long"]
