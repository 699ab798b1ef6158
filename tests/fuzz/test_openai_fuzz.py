"""Finding 5 (item 8): the OpenAI request parser and the HTTP API under fuzzing.

Arbitrary JSON (and arbitrary bytes) through the parser: a valid request or a 400
envelope, never another exception. Then schemathesis, driven by the published
``/openapi.json``, against a live server (tiny random model's tokenizer, fake decode
backend): no 5xx, every 4xx is the OpenAI envelope.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.params_pb import params_to_pb
from router.openai_http import OpenAIServer
from router.openai_protocol import BadRequest, parse_chat, parse_completion, parse_json
from router.openapi import openapi_document
from router.request import GenerationError, validate_request
from router.tokenizer import RouterTokenizer
from tests.router_fakes import (
    FakeDecodeBackend,
    FakeDecodeWorker,
    FakeTokenizer,
    RecordingPolicy,
    make_generator,
)

FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "min_tokens",
          "temperature", "top_p", "top_k", "seed", "n", "stop", "logprobs", "top_logprobs",
          "stream", "stream_options", "ignore_eos", "echo", "model", "presence_penalty",
          "role", "content", "include_usage", "type", "text"]
_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
            | st.sampled_from(["user", "assistant", "text", "hi"]))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=5), max_leaves=20)
_PROMPT = st.text(max_size=30) | st.lists(st.integers(0, 2000), max_size=8)
_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot"]),
                                            "content": st.text(max_size=30)}),
                     min_size=1, max_size=3)
# Edge values a fuzzer's dictionary would hold: non-finite floats, int32/int64/uint64
# edges, just past the default max_tokens.
_EDGES = st.sampled_from([float("nan"), float("inf"), -float("inf"), 2**31 - 1, 2**31, 2**32,
                          2**63, 2**64, -2**63, 17, 10**6, 1e308, -0.0, "", "\x00"])
_VALUES = st.one_of(_EDGES, _EDGES, _EDGES, st.integers(-3, 40), st.integers(), st.floats(),
                    _JSON)
_EXTRA = st.dictionaries(st.sampled_from(FIELDS[2:12]) | st.sampled_from(FIELDS), _VALUES,
                         max_size=3)
# A plausible request with a few fields set to anything: most examples reach the checks
# past the prompt's, where the bugs were. (chat, body)
REQUESTS = st.one_of(
    st.tuples(st.just(False), st.builds(lambda p, x: {"prompt": p, **x}, _PROMPT, _EXTRA)),
    st.tuples(st.just(True), st.builds(lambda m, x: {"messages": m, **x}, _MESSAGES, _EXTRA)))
BODIES = REQUESTS.map(lambda r: r[1])


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=REQUESTS)
def test_finding5_any_json_object_is_a_request_or_a_400(
        request: tuple[bool, dict[str, Any]]) -> None:
    """Never an exception other than BadRequest / GenerationError (INVALID_ARGUMENT)."""
    chat, body = request
    try:
        parsed = (parse_chat if chat else parse_completion)(body)
    except BadRequest as e:
        assert e.status == 400 and e.envelope()["error"]["message"]
        return
    for req in parsed.requests("fuzz"):
        try:
            validate_request(req, "fake-model", FakeTokenizer(), 64)
        except GenerationError as e:
            assert e.code in ("INVALID_ARGUMENT", "NOT_FOUND"), e.code
        params_to_pb(req.params)  # the hop to the decode worker must take them too


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200) | BODIES.map(lambda b: json.dumps(b).encode()))
def test_finding5_any_bytes_parse_to_json_or_a_400(raw: bytes) -> None:
    try:
        parse_json(raw)
    except BadRequest as e:
        assert e.status == 400 and e.param is None


class _LiveServer:
    """The router's HTTP API on its own event loop in a thread, port 0."""

    def __init__(self, model: Path) -> None:
        self.backend = FakeDecodeBackend([FakeDecodeWorker("d1")])
        self.generator = make_generator(self.backend, RecordingPolicy(["d1"]), max_model_len=64)
        self.generator.tokenizer = RouterTokenizer(model)
        self.server = OpenAIServer(self.generator, self.generator.metrics.registry, None,
                                   lambda: True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start("127.0.0.1", 0), self.loop).result(30)
        return f"http://127.0.0.1:{self.server.port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def live(tiny_llama: Path) -> Iterator[tuple[str, _LiveServer]]:
    server = _LiveServer(tiny_llama)
    with server as url:
        yield url, server
    assert server.generator.running == 0 and server.backend.open_streams == 0


def test_finding5_the_published_document_is_the_served_one(live: tuple[str, _LiveServer]) -> None:
    import requests

    got = requests.get(f"{live[0]}/openapi.json", timeout=10)
    assert got.status_code == 200 and got.json() == json.loads(json.dumps(openapi_document()))
    assert set(got.json()["paths"]) == {"/v1/completions", "/v1/chat/completions",
                                        "/v1/models", "/health"}


SCHEMA = schemathesis.openapi.from_dict(openapi_document())


@SCHEMA.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_finding5_schemathesis_no_5xx_and_every_4xx_is_the_envelope(
        case: Any, live: tuple[str, _LiveServer]) -> None:
    response = case.call(base_url=live[0], timeout=30)
    assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["type"] == "invalid_request_error" and err["message"]
