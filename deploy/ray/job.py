"""Ray job entrypoint: ``python -m deploy.ray.job [--config FILE]``.

Brings the cluster of a cluster config up on the Ray cluster this job runs in
(``ray job submit --working-dir . -- python -m deploy.ray.job``) and
serves until the job is stopped (``ray job stop`` sends SIGTERM: router drains,
workers drain, actors go). Same launcher as ``pdserve up`` (deploy/ray/launcher.py);
only the address differs: the job's own cluster ("auto") unless the config names one.
Without ``--config`` it runs the packaged ``deploy/ray/cluster.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from deploy.ray.launcher import PACKAGED_CONFIG, up
from pdserve import logs
from pdserve.cluster_config import ClusterConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.ray.job", description=__doc__)
    p.add_argument("--config", default=str(PACKAGED_CONFIG),
                   help="cluster config YAML (see README; default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray address (default: this job's cluster)")
    a = p.parse_args(argv)
    logs.configure("job")
    try:
        config = ClusterConfig.from_yaml(a.config)
        ray = dataclasses.replace(config.ray, address=a.address or config.ray.address or "auto")
        return up(dataclasses.replace(config, launcher="ray", ray=ray))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
