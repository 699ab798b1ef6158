"""``pdserve chat --address HOST:PORT``: a conversation with the running cluster.

Each turn sends the whole history as ``messages`` to the router's public gRPC API
(the router applies the model's chat template), streams the answer to stdout and
appends it to the history; one line per turn on stderr gives the token counts
(the prompt grows with the history), the finish reason, TTFT and the plan.

Lifecycle: ``ask`` (read a line) → ``answer`` (stream the reply) → ``ask`` ...;
``/exit``, an empty line, EOF or Ctrl-C at the prompt end it. Ctrl-C while an
answer streams cancels that request (the router aborts it on the workers) and
forgets the turn; a failed request is reported and forgotten the same way, so
the history holds only complete turns.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from pdserve.client import Client, Delta

EXIT = "/exit"


@dataclass
class Conversation:
    history: list[dict[str, str]] = field(default_factory=list)

    def user(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})

    def assistant(self, text: str) -> None:
        self.history.append({"role": "assistant", "content": text})

    def forget_last_question(self) -> None:
        if self.history and self.history[-1]["role"] == "user":
            self.history.pop()


def chat(address: str, api_key: str | None, sampling: dict[str, Any],
         out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    client = Client(address, api_key=api_key)
    conv = Conversation()
    print(f"pdserve chat with the cluster at {address}. {EXIT}, an empty line or Ctrl-D quits.",
          file=err)
    try:
        while (line := _ask()) is not None:
            conv.user(line)
            _answer(client, conv, sampling, out, err)
    finally:
        client.close()
    return 0


def _ask() -> str | None:
    try:
        line = input("you> ").strip()
    except (EOFError, KeyboardInterrupt):
        return None
    return None if line in ("", EXIT) else line


def _answer(client: Client, conv: Conversation, sampling: dict[str, Any], out: TextIO,
            err: TextIO) -> None:
    text, last = [], None
    out.write("assistant> ")
    try:
        for d in client.generate(messages=conv.history, **sampling):
            out.write(d.text)
            out.flush()
            text.append(d.text)
            last = d
    except grpc.RpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=err)  # type: ignore[attr-defined]
        conv.forget_last_question()
        return
    except KeyboardInterrupt:  # leaving the iterator cancels the call
        print("\n[interrupted]", file=err)
        conv.forget_last_question()
        return
    out.write("\n")
    out.flush()
    conv.assistant("".join(text))
    if last is not None:
        print(_turn_line(last), file=err)


def _turn_line(last: Delta) -> str:
    t = last.timings
    ttft = f", TTFT {1e3 * t['ttft_s']:.1f} ms" if t.get("ttft_s") else ""
    plan = f", plan={t['plan']}" if t.get("plan") else ""
    return (f"[{last.completion_tokens} tokens, prompt {last.prompt_tokens} tokens, "
            f"finish={last.finish_reason}{plan}{ttft}]")
