"""Integration fixtures: the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.model_files import resolve_model


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model(None)
