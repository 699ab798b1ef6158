"""An engine whose model runner fails a step on purpose: the stand-in for an engine
bug (a sampler crash, a CUDA error) in the engine-death tests.

In process: ``FaultingRunner.install(llm_engine, steps_ok)``. As a real worker
process (the same ``main`` as ``python -m decode_worker``, with this engine)::

    python -m tests.faulting_engine decode --steps-ok 3 --model DIR --port 0 ...
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

from pdserve.config import EngineConfig
from pdserve.engine.engine import LLMEngine


class FaultingRunner:
    """Wraps a ModelRunner: the first ``steps_ok`` steps run, every later one raises;
    with a ``gate``, the failing step sets ``entered`` and waits for the gate first."""

    def __init__(self, runner: Any, steps_ok: int,
                 gate: threading.Event | None = None) -> None:
        self.runner, self.steps_ok, self.steps = runner, steps_ok, 0
        self.gate, self.entered = gate, threading.Event()

    @classmethod
    def install(cls, engine: LLMEngine, steps_ok: int,
                gate: threading.Event | None = None) -> FaultingRunner:
        faulting = cls(engine.runner, steps_ok, gate)
        engine.runner = faulting  # type: ignore[assignment]
        return faulting

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        if self.steps >= self.steps_ok:
            self.entered.set()
            if self.gate is not None:
                self.gate.wait(30)
            raise RuntimeError(f"injected fault in step {self.steps + 1}")
        self.steps += 1
        return self.runner.execute(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def faulting_engine(steps_ok: int) -> Callable[[EngineConfig], LLMEngine]:
    def build(config: EngineConfig) -> LLMEngine:
        engine = LLMEngine(config)
        FaultingRunner.install(engine, steps_ok)
        return engine

    return build


def main(argv: list[str]) -> int:
    from pdserve.worker_host import main as worker_main

    role, steps_ok, rest = argv[0], int(argv[2]), argv[3:]
    assert argv[1] == "--steps-ok", "usage: ROLE --steps-ok N [worker args]"
    if role == "decode":
        from decode_worker.servicer import DecodeServicer as Servicer
    else:
        from prefill_worker.servicer import PrefillServicer as Servicer  # type: ignore[assignment]
    return worker_main(role, Servicer, rest, engine_factory=faulting_engine(steps_ok))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
