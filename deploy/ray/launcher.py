"""``pdserve up`` on Ray (``launcher: ray``, the ``ray`` entry point in the
``pdserve.launchers`` group, see pdserve/launchers.py): router, prefill and decode
workers as actors.

CONNECTING (start a local Ray instance, or join ``ray.address``) → PLACING (one
placement group per worker, on a node with the role's resource: by default
``pdserve_prefill`` / ``pdserve_decode``, plus GPUs when configured) → STARTING
(registry, worker actors, then the router actor fed by the registry) → SERVING
(an actor whose process exits — a crash, an engine that died and exited 70, kill
-9 — is restarted by Ray up to ``ray.max_restarts`` times, router included; see
deploy/ray/actors.py) → STOPPING (router first, then workers drain; actors killed, placement groups
removed, the local Ray instance shut down if we started it) → STOPPED.

A local Ray instance gets exactly the resources the config asks for, so one
machine always fits. Workers learn their slot among the workers on the same host
(node IP: several raylets on one host share its CPUs) for pdserve/placement.py.
Actors ask for 0 CPUs: the CPU a worker uses is decided by pinning, not by Ray.

With ``certs`` (mTLS, see pdserve/cluster_config.py) every role reads its
certificate files by the same path on its node: DIR must be on a filesystem every
node shares (or copied to the same path on each). Decode workers get the prefill
pool as their allowlist: ``host:port`` from the config, or, when ``host`` is a
wildcard, the node IP of each prefill worker's placement group (a restarted actor
stays in its group, so on its node and port).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from deploy.ray.actors import Registry, RoleProcess
from pdserve.cluster_config import ClusterConfig, Member
from pdserve.launch import interrupt_on_stop_signals, role_env, router_command, watch
from pdserve.worker_args import worker_command

REGISTRY = "pdserve-registry"
PACKAGED_CONFIG = Path(__file__).with_name("cluster.yaml")
"""What ``pdserve up --address`` and ``python -m deploy.ray.job`` run without --config."""


@dataclass
class Placed:
    role: str
    name: str
    member: Member
    pg: PlacementGroup
    node_id: str = ""
    actor: Any = None


@dataclass
class RayLauncher:
    config: ClusterConfig
    state: str = "NEW"
    started_ray: bool = False
    connected: bool = False
    workers: list[Placed] = field(default_factory=list)
    registry: Any = None
    router: Any = None
    infos: dict[str, dict[str, Any]] = field(default_factory=dict)

    def start(self, timeout: float = 600) -> None:
        try:
            self._connect()
            self._place(timeout)
            self._start_actors(timeout)
        except BaseException:
            self.stop()
            raise
        self.state = "SERVING"

    def _connect(self) -> None:
        self.state = "CONNECTING"
        r = self.config.ray
        if ray.is_initialized():  # a test or a job that already connected
            return
        if r.address is None:
            resources = {r.prefill_resource: float(len(self.config.prefill)),
                         r.decode_resource: float(len(self.config.decode))}
            ray.init(namespace=r.namespace, resources=resources, include_dashboard=False,
                     object_store_memory=128 * 1024 * 1024)
            self.started_ray = True
        else:
            ray.init(address=r.address, namespace=r.namespace)
        self.connected = True

    def _bundle(self, role: str) -> dict[str, float]:
        r = self.config.ray
        gpus = r.prefill_gpus if role == "prefill" else r.decode_gpus
        bundle = {r.prefill_resource if role == "prefill" else r.decode_resource: 1.0}
        return {**bundle, "GPU": gpus} if gpus else bundle

    def _place(self, timeout: float) -> None:
        self.state = "PLACING"
        c = self.config
        for role, members in (("prefill", c.prefill), ("decode", c.decode)):
            for i, m in enumerate(members):
                pg = placement_group([self._bundle(role)], strategy="STRICT_PACK",
                                     name=f"pdserve-{role}-{i}")
                self.workers.append(Placed(role, f"{role}-{i}", m, pg))
        try:
            ray.get([w.pg.ready() for w in self.workers], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"Ray could not place the workers within {timeout:.0f} s: each prefill worker "
                f"needs a node with {self._bundle('prefill')}, each decode worker "
                f"{self._bundle('decode')} (ray start --resources=...)") from None
        for w in self.workers:
            w.node_id = placement_group_table(w.pg)["bundles_to_node_id"][0]

    def _slots(self) -> dict[str, tuple[int, int]]:
        """Worker name → (slot, slots) among the workers on the same host."""
        ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        by_host: dict[str, list[str]] = {}
        for w in self.workers:  # prefill first: slot 0 is CPU 0 on a 2-CPU box
            by_host.setdefault(ip_of.get(w.node_id, w.node_id), []).append(w.name)
        return {name: (i, len(names)) for names in by_host.values()
                for i, name in enumerate(names)}

    def _prefill_pool(self) -> list[str]:
        """The addresses the router will know the prefill workers by (their actors'
        ``address``): the config's host, or the node IP for a wildcard host."""
        if self.config.host not in ("0.0.0.0", "::", ""):
            return self.config.prefill_addresses()
        ip_of = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        return [f"{ip_of.get(w.node_id, w.node_id)}:{w.member.port}"
                for w in self.workers if w.role == "prefill" and w.member.port]

    def _start_actors(self, timeout: float) -> None:
        self.state = "STARTING"
        c, r = self.config, self.config.ray
        self.registry = ray.remote(Registry).options(
            name=REGISTRY, num_cpus=0, get_if_exists=False).remote()
        slots = self._slots()
        pool = self._prefill_pool()
        probe_tls = c.tls("client")
        tls = asdict(probe_tls) if probe_tls else None
        role_actor = ray.remote(RoleProcess)
        for w in self.workers:
            spec = {"role": w.role, "name": w.name, "host": c.host, "port": w.member.port,
                    "timeout": timeout, "registry": REGISTRY, "env": role_env(), "tls": tls,
                    "argv": worker_command(c.worker(w.role, w.member, *slots[w.name], pool))}
            bundle = self._bundle(w.role)
            w.actor = role_actor.options(
                name=f"pdserve-{w.name}", num_cpus=0, num_gpus=bundle.pop("GPU", 0),
                resources=bundle, max_restarts=r.max_restarts, max_concurrency=2,
                scheduling_strategy=PlacementGroupSchedulingStrategy(w.pg, 0),
            ).remote(spec)
        for w in self.workers:
            self.infos[w.name] = ray.get(w.actor.info.remote(), timeout=timeout)
        spec = {"role": "router", "name": "router", "host": c.host, "port": c.router_port,
                "timeout": 120, "registry": REGISTRY, "tls": tls,
                "argv": router_command(c.router([], [], members_stdin=True)),
                "env": role_env(c.api_key)}
        placement: dict[str, Any] = (
            {"resources": {r.router_resource: 1}} if r.router_resource else
            {"scheduling_strategy": NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=True)})
        self.router = role_actor.options(name="pdserve-router", num_cpus=0,
                                         max_concurrency=2, max_restarts=r.max_restarts,
                                         **placement).remote(spec)
        self.infos["router"] = ray.get(self.router.info.remote(), timeout=timeout)

    def alive(self) -> bool:
        """False once the router actor is dead for good (its ``max_restarts`` used up);
        while Ray restarts it, the call waits for the new one (``max_task_retries``)."""
        try:
            ray.get(self.router.info.options(max_task_retries=-1).remote(), timeout=30)
        except ray.exceptions.GetTimeoutError:
            return True  # still restarting (a hung router is not Ray's to restart either)
        except Exception:
            return False
        return True

    def stop(self, grace: float = 15.0) -> None:
        self.state = "STOPPING"
        for group in ([self.router], [w.actor for w in self.workers]):  # router first
            actors = [a for a in group if a is not None]
            refs = [a.stop.remote(grace) for a in actors]
            if refs:
                ray.wait(refs, num_returns=len(refs), timeout=grace + 5)
            for a in actors:
                _quietly(ray.kill, a, no_restart=True)
        if self.registry is not None:
            _quietly(ray.kill, self.registry)
        for w in self.workers:
            _quietly(remove_placement_group, w.pg)
        if self.connected:
            ray.shutdown()  # stops the local instance when we started it
        self.state = "STOPPED"

    def banner(self) -> str:
        rows = [f"  {i['role']:<10} {i['address']:<22} pid {i['pid']:<8} node {i['node_id'][:12]}"
                f"\n  {'':<10} log {i['log']} (ray logs actor --id {i['actor_id']} --err)"
                for i in self.infos.values()]
        where = "local Ray instance" if self.started_ray else f"Ray at {self.config.ray.address}"
        return (f"\npdserve cluster up on {where} (each role logs to its actor's stderr, "
                "a file on its node, which Ray also streams here):\n" + "\n".join(rows) +
                '\n\nTry:  .venv/bin/pdserve generate "What is the capital of France?" '
                f"--chat --address {self.infos['router']['address']}\nCtrl-C stops the cluster.")


def _quietly(fn: Any, *args: Any, **kw: Any) -> None:
    try:
        fn(*args, **kw)
    except Exception:  # already gone: nothing left to stop
        pass


def up(c: ClusterConfig) -> int:
    """Run the cluster until Ctrl-C or SIGTERM; 1 if the router died for good."""
    from pdserve.model_files import resolve_model

    resolve_model(c.model)  # convert once here, before the workers on this host race to
    interrupt_on_stop_signals()
    launcher = RayLauncher(c)
    try:
        launcher.start()
        print(launcher.banner(), flush=True)
        return watch(launcher.alive, 1.0, "the router actor died; stopping")
    except KeyboardInterrupt:  # while starting
        return 0
    finally:
        if launcher.state != "STOPPED":
            launcher.stop()
