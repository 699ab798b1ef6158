"""Multi-node Ray on one machine (ray.cluster_utils.Cluster): a "cloud" node that
alone offers prefill, a "local" node that alone offers decode, a head for the
router. Each role must land on its node and a request must cross them."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pdserve.cluster_config import ClusterConfig
from tests.integration.ray_helpers import ask, blocks_free, cluster_yaml

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[dict[str, Any]]:
    ray_dir = tempfile.mkdtemp(prefix="pdray-", dir="/tmp")
    # cluster_utils writes /tmp/ray/ray_current_cluster without creating /tmp/ray,
    # which a freshly booted machine lacks.
    Path("/tmp/ray").mkdir(exist_ok=True)
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {"pdserve_router": 1}, "include_dashboard": False,
        "temp_dir": ray_dir})
    try:
        nodes = {"head": cluster.head_node,
                 "cloud": cluster.add_node(num_cpus=1, resources={"pdserve_prefill": 1}),
                 "local": cluster.add_node(num_cpus=1, resources={"pdserve_decode": 1})}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="pdserve-multinode")
        yield {name: n.node_id for name, n in nodes.items()}
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.integration
def test_roles_land_on_their_nodes_and_a_request_crosses_them(
        three_nodes: dict[str, str], default_model_dir: Path, tmp_path: Path) -> None:
    from deploy.ray.launcher import RayLauncher

    raw = cluster_yaml(tmp_path / "c.yaml", default_model_dir)
    config = ClusterConfig.from_yaml(tmp_path / "c.yaml")
    config = dataclasses.replace(config, ray=dataclasses.replace(
        config.ray, router_resource="pdserve_router", max_restarts=0))
    launcher = RayLauncher(config)
    launcher.start(timeout=180)
    try:
        where = {name: info["node_id"] for name, info in launcher.infos.items()}
        assert where == {"prefill-0": three_nodes["cloud"], "decode-0": three_nodes["local"],
                         "router": three_nodes["head"]}
        ids, plan = ask(int(raw["router_port"]))  # type: ignore[call-overload]
        assert len(ids) == 4 and plan == "remote"  # prefilled on "cloud", decoded on "local"
        assert blocks_free(raw["prefill"][0]["metrics_port"],  # type: ignore[index]
                           raw["decode"][0]["metrics_port"])  # type: ignore[index]
    finally:
        launcher.stop()
    assert launcher.state == "STOPPED"
    deadline = time.monotonic() + 10
    while ray.util.list_named_actors():  # registry, router and workers all gone
        assert time.monotonic() < deadline, ray.util.list_named_actors()
        time.sleep(0.2)
