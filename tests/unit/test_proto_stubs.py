"""The committed gRPC stubs are exactly what protoc makes from proto/."""

from __future__ import annotations

import filecmp
import shutil

from pdserve._proto.generate import OUT, generate_to_temp


def test_stubs_are_up_to_date() -> None:
    fresh = generate_to_temp() / "pdserve" / "v1"
    try:
        committed = OUT / "pdserve" / "v1"
        names = sorted(p.name for p in fresh.iterdir())
        assert names == sorted(p.name for p in committed.iterdir() if p.name != "__pycache__")
        _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
        assert not mismatch and not errors, f"regenerate with python -m pdserve._proto.generate: {mismatch}"
    finally:
        shutil.rmtree(fresh.parents[1])
