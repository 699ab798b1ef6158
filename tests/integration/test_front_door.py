"""The router's front door on the real cluster: the OpenAI HTTP API driven by the
official ``openai`` client, gRPC health/reflection/auth/deadlines/Abort, and the
Prometheus counters moving with traffic. One cluster (with an API key) for the
whole module."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.client import AsyncClient, Client
from pdserve.cluster_config import ClusterConfig
from tests.integration.front_door import (
    free_port,
    health,
    http_get,
    http_post,
    router_process,
    running,
    scrape,
    split_cluster,
    wait_health,
    wait_pools_empty,
)

pytestmark = pytest.mark.integration
KEY = "sk-test-front-door"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def cluster(default_model_dir: Path) -> Iterator[ClusterConfig]:
    with running(split_cluster(default_model_dir, http_port=free_port(), api_key=KEY,
                               local_prefill_below=1, policy="load_aware")) as c:
        yield c


@pytest.fixture(scope="module")
def oai(cluster: ClusterConfig) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.http_port}/v1", api_key=KEY,
                           max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(oai: openai.OpenAI) -> str:
    return oai.models.list().data[0].id


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_streaming_chat_with_usage(oai: openai.OpenAI, model: str) -> None:
    stream = oai.chat.completions.create(
        model=model, messages=_chat("Name three colors."), max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and
              c.choices[0].finish_reason]
    assert text and finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens > 5
    assert all(c.usage is None for c in chunks[:-1])


def test_a_repeated_prompt_reports_its_cached_tokens(oai: openai.OpenAI, model: str) -> None:
    """OpenAI's usage.prompt_tokens_details.cached_tokens: the prefill worker's prefix
    cache served the repeat (every prompt is remote here)."""
    prompt = list(range(5000, 5050))  # 50 tokens: 3 full blocks can be cached

    def cached() -> int:
        r = oai.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
        assert r.usage is not None and r.usage.prompt_tokens == 50
        details = r.usage.prompt_tokens_details
        return details.cached_tokens if details is not None else -1

    assert cached() == 0 and cached() == 48


def test_sse_ends_with_done(cluster: ClusterConfig, model: str) -> None:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 3, "stream": True,
                       "ignore_eos": True}).encode()
    status, raw = http_post(f"http://127.0.0.1:{cluster.http_port}/v1/completions", body,
                            {"Authorization": f"Bearer {KEY}"})
    events = [e for e in raw.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    choices = [json.loads(e[6:])["choices"][0] for e in events[:-1]]
    assert choices[-1]["finish_reason"] == "length" and "".join(c["text"] for c in choices)


def test_completion_matches_grpc_and_carries_logprobs(cluster: ClusterConfig,
                                                      oai: openai.OpenAI, model: str) -> None:
    prompt = list(range(1000, 1020))
    r = oai.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                               logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (20, 6)
    assert c.finish_reason == "length" and c.logprobs is not None
    assert len(c.logprobs.tokens or []) == 6 and "".join(c.logprobs.tokens or []) == c.text
    assert all(1 <= len(t) <= 3 for t in c.logprobs.top_logprobs or [])
    client = Client(f"127.0.0.1:{cluster.router_port}", api_key=KEY, timeout=60)
    try:
        via_grpc = "".join(d.text for d in client.generate(prompt, max_tokens=6,
                                                           ignore_eos=True))
    finally:
        client.close()
    assert via_grpc == c.text


def test_chat_logprobs_and_n(oai: openai.OpenAI, model: str) -> None:
    r = oai.chat.completions.create(model=model, messages=_chat("What is 2 + 2?"), max_tokens=5,
                                    temperature=0.8, seed=7, n=2, logprobs=True,
                                    top_logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.logprobs is not None and len(c.logprobs.content or []) == 5
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content or [])
    assert r.usage is not None and r.usage.completion_tokens == 10


def test_stop_strings(oai: openai.OpenAI, model: str) -> None:
    prompt = "The capital of France is"
    full = oai.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    r = oai.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                               stop=[stop, "@@never@@"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproducibility(oai: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        r = oai.chat.completions.create(model=model, messages=_chat("Write a short poem."),
                                        max_tokens=8, temperature=0.8, seed=seed)
        return r.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert len({first, sample(1), sample(2)}) > 1  # the seed matters


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"messages": []}, "messages"),
    ({"extra_body": {"min_tokens": 9}, "max_tokens": 4}, "min_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
])
def test_bad_chat_fields_get_400_naming_the_param(oai: openai.OpenAI, model: str,
                                                   kwargs: dict, param: str) -> None:
    args = {"model": model, "messages": _chat("hi"), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**args)
    assert e.value.status_code == 400 and e.value.param == param
    assert e.value.type == "invalid_request_error" and e.value.message


def test_bad_completion_fields_and_context_length(oai: openai.OpenAI, model: str) -> None:
    for kwargs, param in [({"prompt": []}, "prompt"), ({"logprobs": 30}, "logprobs"),
                          ({"prompt": [1, 2, 10**9]}, "prompt")]:
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model=model, **{"prompt": "hi", "max_tokens": 4, **kwargs})
        assert e.value.param == param
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model, messages=_chat("hi " * 50), max_tokens=8190)
    msg = e.value.message
    assert "This model's maximum context length is 8192 tokens. However, you requested" in msg
    assert "in the messages, 8190 in the completion). Please reduce the length" in msg
    assert e.value.param == "messages" and e.value.code == "context_length_exceeded"


def test_unknown_model_is_404_and_auth_is_required(cluster: ClusterConfig,
                                                   oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    base = f"http://127.0.0.1:{cluster.http_port}"
    anon = openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anon.models.list()
    anon.close()
    status, body = http_get(f"{base}/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert http_get(f"{base}/health")[0] == 200  # probes and scrapers need no key
    assert http_get(f"{base}/metrics")[0] == 200


def test_stream_disconnect_frees_blocks_on_both_workers(cluster: ClusterConfig,
                                                        oai: openai.OpenAI, model: str) -> None:
    stream = oai.chat.completions.create(model=model, messages=_chat("Tell me a story."),
                                         max_tokens=2000, stream=True,
                                         extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_pools_empty(cluster, 1.0)


def test_disconnect_mid_prefill_frees_blocks(cluster: ClusterConfig, model: str) -> None:
    body = json.dumps({"model": model, "prompt": list(range(1000, 4000)), "max_tokens": 100,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", cluster.http_port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(1.0)  # 3,000 tokens take seconds to prefill
        assert scrape(cluster.prefill[0].metrics_port)["pdserve:num_requests_running"] == 1
    wait_pools_empty(cluster, 1.0)


def test_grpc_health_reflection_models_and_auth(cluster: ClusterConfig, model: str) -> None:
    address = f"127.0.0.1:{cluster.router_port}"
    assert health(address) == SERVING and health(address, "pdserve.v1.Generation") == SERVING
    for m in (cluster.prefill[0], cluster.decode[0]):
        assert health(f"127.0.0.1:{m.port}") == SERVING
    with grpc.insecure_channel(address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        [answer] = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for s in answer.list_services_response.service}
    assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= names
    anon = Client(address, api_key="", timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        list(anon.generate("hi", max_tokens=2))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError):
        anon.list_models()
    assert anon.is_serving()  # health stays open
    anon.close()
    client = Client(address, api_key=KEY, timeout=10)
    assert [(m.id, m.max_model_len) for m in client.list_models()] == [(model, 8192)]
    client.close()


def test_grpc_deadline_and_abort_free_blocks(cluster: ClusterConfig) -> None:
    address = f"127.0.0.1:{cluster.router_port}"

    async def scenario() -> None:
        short = AsyncClient(address, timeout=1.0, api_key=KEY)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in short.generate([1000] * 40, max_tokens=2000, ignore_eos=True):
                pass
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await short.close()
        wait_pools_empty(cluster, 1.0)
        client = AsyncClient(address, timeout=60, api_key=KEY)
        last = None
        async for d in client.generate([1000] * 40, max_tokens=2000, ignore_eos=True,
                                       request_id="abort-me"):
            if last is None:
                assert await client.abort("abort-me")
            last = d
        assert last is not None and last.finish_reason == "abort"
        assert not await client.abort("abort-me")
        await client.close()

    asyncio.run(scenario())
    wait_pools_empty(cluster, 1.0)


def test_metrics_move_with_traffic(cluster: ClusterConfig, oai: openai.OpenAI,
                                   model: str) -> None:
    n, p, k = 3, 20, 5
    ports = {"router": cluster.http_port, "prefill": cluster.prefill[0].metrics_port,
             "decode": cluster.decode[0].metrics_port}
    before = {role: scrape(port) for role, port in ports.items()}
    messages = 0  # token messages relayed (the first may carry two tokens)
    for i in range(n):
        stream = oai.completions.create(
            model=model, prompt=list(range(2000 + i, 2000 + i + p)), max_tokens=k,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        messages += sum(1 for chunk in stream if chunk.choices)
    after = {role: scrape(port) for role, port in ports.items()}

    def grew(role: str, name: str) -> float:
        return after[role][f"pdserve:{name}"] - before[role][f"pdserve:{name}"]

    assert grew("router", "prompt_tokens_total") == n * p
    assert grew("router", "generation_tokens_total") == n * k
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds"):
        assert grew("router", f"{h}_count") == n and grew("router", f"{h}_sum") > 0
    assert grew("router", "inter_token_latency_seconds_count") == messages - n
    assert grew("router", "requests_aborted_total") == 0
    assert after["router"]["pdserve:num_requests_running"] == 0
    assert grew("prefill", "prompt_tokens_total") == n * p
    assert grew("decode", "prompt_tokens_total") == n * p
    assert grew("decode", "generation_tokens_total") == n * k
    assert grew("decode", "kv_transfer_seconds_count") == n
    for role in ("prefill", "decode"):
        assert after[role]["pdserve:num_preemptions_total"] == 0
        assert grew(role, "prefix_cache_queries_total") == n * p
        assert grew(role, "prefix_cache_hits_total") == 0  # n different prompts

    # The first prompt again: both workers find its full block (16 of its 20 tokens)
    # cached, and the prefill worker sends only the 4 tokens the decode worker lacks.
    again = oai.completions.create(model=model, prompt=list(range(2000, 2000 + p)),
                                   max_tokens=k, temperature=0, extra_body={"ignore_eos": True})
    assert again.usage.completion_tokens == k
    final = {role: scrape(ports[role]) for role in ("prefill", "decode")}
    for role in ("prefill", "decode"):
        hits = final[role]["pdserve:prefix_cache_hits_total"]
        assert hits - after[role]["pdserve:prefix_cache_hits_total"] == 16
    sent = (final["decode"]["pdserve:kv_transfer_bytes_total"]
            - after["decode"]["pdserve:kv_transfer_bytes_total"])
    per_request = grew("decode", "kv_transfer_bytes_total") / n
    assert sent == pytest.approx(per_request * 4 / p)


def test_router_health_follows_decode_workers(default_model_dir: Path) -> None:
    """A stand-in decode worker (a real grpc.health.v1 server) goes up and down."""
    from grpc_health.v1 import health as health_lib
    from grpc_health.v1 import health_pb2_grpc

    worker = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health_lib.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, worker)
    decode_port = worker.add_insecure_port("127.0.0.1:0")
    worker.start()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    grpc_port, http_port = free_port(), free_port()
    address, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
    try:
        with router_process(str(default_model_dir), f"127.0.0.1:{decode_port}", grpc_port,
                            http_port):
            wait_health(address, NOT_SERVING)
            assert http_get(f"{base}/health")[0] == 503
            status, body = http_post(f"{base}/v1/completions", b'{"prompt": "hi"}')
            assert status == 503 and json.loads(body)["error"]["type"] == "server_error"
            servicer.set("", SERVING)
            wait_health(address, SERVING, 5)
            assert http_get(f"{base}/health")[0] == 200
            worker.stop(0)  # the only decode worker is gone
            wait_health(address, NOT_SERVING, 5)
            assert http_get(f"{base}/health")[0] == 503
    finally:
        worker.stop(0)


def test_sigterm_drains_in_flight_requests(cluster: ClusterConfig,
                                           default_model_dir: Path) -> None:
    grpc_port, http_port = free_port(), free_port()
    address = f"127.0.0.1:{grpc_port}"
    decode = f"127.0.0.1:{cluster.decode[0].port}"
    # A grace far above the request's time: on a loaded box 30 tokens can take seconds.
    with router_process(str(default_model_dir), decode, grpc_port, http_port,
                        "--drain-grace", "60") as proc:
        wait_health(address, SERVING)
        client = Client(address, timeout=60, api_key="")
        stream = client.generate([1000] * 40, max_tokens=30, ignore_eos=True)
        tokens = len(next(stream).token_ids)
        proc.send_signal(signal.SIGTERM)
        wait_health(address, NOT_SERVING, 2)  # still answering, no longer ready
        assert http_get(f"http://127.0.0.1:{http_port}/health")[0] == 503
        last = None
        for last in stream:
            tokens += len(last.token_ids)
        assert last is not None and last.finish_reason == "length" and tokens == 30
        assert proc.wait(timeout=60) == 0
        client.close()
    wait_pools_empty(cluster)
