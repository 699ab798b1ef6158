"""`pdserve chat --address` holds a conversation with a real local cluster (router,
prefill and decode worker processes on the tiny model, real gRPC), typed through a
pty as a user would."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from pdserve.cluster_config import ClusterConfig, Member
from pdserve.process_launcher import start, stop

REPO = Path(__file__).resolve().parents[2]
TURN = re.compile(r"\[(\d+) tokens, prompt (\d+) tokens, finish=(\w+)")
QUESTION = "Hello world!"  # the same each turn: only the history can make the prompt grow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_cluster(tiny_llama: Path) -> Iterator[ClusterConfig]:
    c = ClusterConfig(model=str(tiny_llama), dtype="float32", router_port=_free_port(),
                      http_port=0, local_prefill_below=1, policy="load_aware", pin="off",
                      prefill=[Member(_free_port(), _free_port(), None, 1)],
                      decode=[Member(_free_port(), _free_port(), None, 1)])
    procs = start(c, timeout=300)
    try:
        yield c
    finally:
        stop(procs)


def _spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return pexpect.spawn(sys.executable, ["-m", "pdserve.cli", "chat", *args], env=env,
                         cwd=str(REPO), encoding="utf-8", timeout=120)


def test_three_turns_keep_the_history(tiny_cluster: ClusterConfig) -> None:
    chat = _spawn("--address", f"127.0.0.1:{tiny_cluster.router_port}", "--max-tokens", "6")
    try:
        chat.expect("pdserve chat with the cluster at")
        turns = []
        for _ in range(3):
            chat.expect_exact("you> ")
            chat.sendline(QUESTION)
            chat.expect_exact("assistant> ")
            chat.expect(TURN)  # the streamed reply, then its token counts
            assert chat.match is not None
            completion, prompt, finish = chat.match.groups()
            turns.append((int(prompt), int(completion)))
            assert int(completion) > 0 and finish in ("length", "stop")
        chat.expect_exact("you> ")
        chat.sendline("/exit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0
    (p1, _), (p2, _), (p3, _) = turns
    # The same question each turn: without the history every prompt would be p1 tokens.
    # With it each prompt adds the last answer and the question again (the template's
    # generation prompt, counted once, is the slack).
    assert p2 >= 2 * p1 - 8 and p3 >= p2 + p1 - 8, turns


def test_eof_ends_the_chat(tiny_cluster: ClusterConfig) -> None:
    chat = _spawn("--address", f"127.0.0.1:{tiny_cluster.router_port}")
    try:
        chat.expect_exact("you> ")
        chat.sendeof()
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0
