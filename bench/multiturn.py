"""W7, multi-turn chat: what prefix caching saves a conversation.

Starts the disaggregated cluster twice in one run, with prefix caching on and off
(prefill on CPU 0, decode on CPU 1, one thread each, every prompt prefilled remotely),
and plays the same conversations through the OpenAI chat API: each opens with a
~1,500-token system message, and each of its 8 turns adds a ~100-token user message
and the model's 32-token answer. Conversations are interleaved turn by turn
(conversation 0 turn 1, conversation 1 turn 1, ..., conversation 0 turn 2, ...), one
request at a time, so every figure belongs to one request: TTFT (client side), the
prompt's tokens, the KV bytes the decode worker received and the prefix-cache hit
tokens of both workers (their /metrics, read before and after each turn).

Text is made of whole-word tokens (bench/grounded.py), so the history the client
sends back re-tokenizes to the same ids and a turn's prompt extends the last one.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from bench.grounded import load_tokenizer, word_ids
from bench.progress import Progress, QuietProgress
from pdserve.cluster_config import ClusterConfig, Member
from pdserve.process_launcher import start, stop

CONVERSATIONS = 3
TURNS = 8
HISTORY_TOKENS = 1500
USER_TOKENS = 100
OUTPUT_TOKENS = 32
_COUNTERS = ("pdserve:kv_transfer_bytes_total", "pdserve:prefix_cache_hits_total",
             "pdserve:prefix_cache_queries_total")


@dataclass(frozen=True)
class Conversation:
    system: str
    users: list[str]


def conversations(tokenizer: Any, n: int = CONVERSATIONS, turns: int = TURNS,
                  seed: int = 7) -> list[Conversation]:
    words = word_ids(tokenizer)
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        return str(tokenizer.decode([rng.choice(words) for _ in range(tokens)]).strip())

    return [Conversation(text(HISTORY_TOKENS), [text(USER_TOKENS) for _ in range(turns)])
            for _ in range(n)]


def run_w7(model: str | None, dtype: str, progress: Progress | None = None,
           n: int = CONVERSATIONS, turns: int = TURNS) -> dict[str, Any]:
    convs = conversations(load_tokenizer(model), n, turns)
    out: dict[str, Any] = {"shape": {"conversations": n, "turns": turns,
                                     "history_tokens": HISTORY_TOKENS,
                                     "user_tokens": USER_TOKENS,
                                     "output_tokens": OUTPUT_TOKENS}}
    with (progress or QuietProgress()).bar("W7 multi-turn chat", 2 * n * turns,
                                           unit="req") as bar:
        for caching in (True, False):
            mode = "prefix_caching" if caching else "no_prefix_caching"
            bar.show(f"W7 {mode}: starting the cluster")
            turns_out = _play(_cluster(model, dtype, caching), convs, turns, bar)
            out[mode] = {"turns": turns_out, "summary": _summary(turns_out)}
    on, off = out["prefix_caching"]["summary"], out["no_prefix_caching"]["summary"]
    out["ttft_later_turns_speedup"] = off["ttft_later_ms_p50"] / on["ttft_later_ms_p50"]
    return out


def _cluster(model: str | None, dtype: str, caching: bool) -> ClusterConfig:
    two = len(os.sched_getaffinity(0)) >= 2
    return ClusterConfig(model=model, dtype=dtype, router_port=_free_port(),
                         http_port=_free_port(), policy="load_aware", local_prefill_below=1,
                         enable_prefix_caching=caching,
                         prefill=[Member(_free_port(), _free_port(), (0,) if two else None, 1)],
                         decode=[Member(_free_port(), _free_port(), (1,) if two else None, 1)])


def _play(c: ClusterConfig, convs: list[Conversation], turns: int,
          bar: Any) -> list[dict[str, Any]]:
    import openai

    procs = start(c)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{c.http_port}/v1", api_key="-",
                               timeout=600)
        model = client.models.list().data[0].id
        histories = [[{"role": "system", "content": conv.system}] for conv in convs]
        rows = []
        for t in range(turns):
            for i, conv in enumerate(convs):
                histories[i].append({"role": "user", "content": conv.users[t]})
                row, answer = _turn(client, model, histories[i], c)
                histories[i].append({"role": "assistant", "content": answer})
                rows.append({"conversation": i, "turn": t + 1, **row})
                bar.advance()
        return rows
    finally:
        stop(procs)


def _turn(client: Any, model: str, messages: list[dict[str, str]],
          c: ClusterConfig) -> tuple[dict[str, Any], str]:
    before = _scrape(c)
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=OUTPUT_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    after = _scrape(c)
    grew = {role: {k: after[role][k] - before[role][k] for k in _COUNTERS} for role in after}
    row = {"ttft_ms": None if ttft is None else 1e3 * ttft,
           "prompt_tokens": usage.prompt_tokens if usage else None,
           "kv_bytes": grew["decode"]["pdserve:kv_transfer_bytes_total"],
           "prefill_hit_tokens": grew["prefill"]["pdserve:prefix_cache_hits_total"],
           "decode_hit_tokens": grew["decode"]["pdserve:prefix_cache_hits_total"]}
    return row, "".join(parts)


def _scrape(c: ClusterConfig) -> dict[str, dict[str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for role, member in (("prefill", c.prefill[0]), ("decode", c.decode[0])):
        url = f"http://127.0.0.1:{member.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        values = dict.fromkeys(_COUNTERS, 0.0)
        for family in text_string_to_metric_families(body):
            for s in family.samples:
                if s.name in values:
                    values[s.name] += s.value
        out[role] = values
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    first = [r for r in rows if r["turn"] == 1]
    later = [r for r in rows if r["turn"] > 1]
    by_conv: dict[int, list[dict[str, Any]]] = {r["conversation"]: [] for r in rows}
    for r in rows:
        by_conv[r["conversation"]].append(r)
    new_tokens = [b["prompt_tokens"] - a["prompt_tokens"]
                  for turns in by_conv.values() for a, b in zip(turns, turns[1:], strict=False)]
    kv_later = [r["kv_bytes"] for r in later]
    bytes_per_token = statistics.median(r["kv_bytes"] / r["prompt_tokens"] for r in first)
    return {
        "ttft_first_ms_p50": statistics.median(r["ttft_ms"] for r in first),
        "ttft_later_ms_p50": statistics.median(r["ttft_ms"] for r in later),
        "ttft_later_ms_max": max(r["ttft_ms"] for r in later),
        "prompt_tokens_later_p50": statistics.median(r["prompt_tokens"] for r in later),
        "new_tokens_per_turn_p50": statistics.median(new_tokens),
        "kv_bytes_per_prompt_token": bytes_per_token,
        "kv_bytes_later_p50": statistics.median(kv_later),
        "kv_tokens_later_p50": statistics.median(kv_later) / bytes_per_token,
        "prefill_hit_tokens": sum(r["prefill_hit_tokens"] for r in rows),
        "decode_hit_tokens": sum(r["decode_hit_tokens"] for r in rows),
        # Each request's decode-side hits are exactly the prompt tokens not sent.
        "decode_hits_are_tokens_not_sent": all(
            r["prompt_tokens"] - r["kv_bytes"] / bytes_per_token == r["decode_hit_tokens"]
            for r in rows),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
