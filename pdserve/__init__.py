"""pdserve: a disaggregated prefill/decode LLM serving cluster."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "EngineConfig"]

if TYPE_CHECKING:
    from pdserve.config import EngineConfig
    from pdserve.engine.llm import LLM
    from pdserve.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: the router imports pdserve.* and must never pull in torch.
    if name == "LLM":
        from pdserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pdserve.sampling_params import SamplingParams

        return SamplingParams
    if name == "EngineConfig":
        from pdserve.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
