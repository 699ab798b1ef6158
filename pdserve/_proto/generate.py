"""Regenerate the committed stubs: ``python -m pdserve._proto.generate``.

Stubs land in ``pdserve/_proto/pdserve/v1/`` and import each other as
``pdserve._proto.pdserve.v1``; a test regenerates them and fails on any difference.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT = Path(__file__).resolve().parent
FILES = ["pdserve/v1/common.proto", "pdserve/v1/worker.proto", "pdserve/v1/api.proto"]


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *FILES]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    for f in (out / "pdserve" / "v1").glob("*.py*"):
        text = re.sub(r"^from pdserve\.v1 import", "from pdserve._proto.pdserve.v1 import",
                      f.read_text(), flags=re.M)
        f.write_text(text)
    for d in (out / "pdserve", out / "pdserve" / "v1"):
        (d / "__init__.py").touch()


def main() -> int:
    generate(OUT)
    return 0


def generate_to_temp() -> Path:
    tmp = Path(tempfile.mkdtemp())
    generate(tmp)
    return tmp


if __name__ == "__main__":
    sys.exit(main())
