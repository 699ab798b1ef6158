"""pdserve as a Ray Serve application: ``deploy.ray.serve:app`` (the KubeRay RayService).

serveConfigV2 (or a ``serve run`` / ``serve deploy`` config file)::

    applications:
      - name: pdserve
        route_prefix: /
        import_path: deploy.ray.serve:app
        args: {config: /etc/pdserve/cluster.yaml}   # optional: router_http_port: 8001

``app`` is the application builder Serve calls with those ``args``. Its one
deployment, ``PDServe`` (one replica), brings the cluster of the config up when it
starts, with the launcher of ``pdserve up`` (deploy/ray/launcher.py: router, prefill
and decode actors, each worker in its placement group); forwards every HTTP request
Serve's proxy hands it (the OpenAI API, ``/health``, ``/metrics``) to the router's
OpenAI HTTP endpoint and streams the answer back (server-sent events as they come);
and stops that cluster when Serve shuts the replica down (router first, workers
drain). gRPC clients keep using the router's ``router_port``.

Ports: Serve's proxy owns the HTTP port (8000 by default: the ``serve`` port of the
manifest), which is also the router's default HTTP port. So here the router's HTTP
listens on ``router_http_port`` (default: a free port picked on the replica's node)
and the config's ``http_port`` is not used. The router runs next to the replica (soft
node affinity); when the config names ``ray.router_resource`` the replica asks for a
sliver of it, so both land on such a node.

STARTING (``__init__``: the cluster comes up) → SERVING → STOPPED (``__del__``, which
Serve calls on shutdown). A dead router actor fails Serve's health check; Serve then
replaces the replica, and the cluster with it.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deploy.ray.launcher import RayLauncher
from pdserve.cluster_config import ClusterConfig
from pdserve.tls import client_ssl_context
from router.openai_protocol import BadRequest

log = logging.getLogger("ray.serve")

ARGS = ("config", "router_http_port")
# Per connection, not end to end: never forwarded (RFC 9110 §7.6.1), plus the ones
# the HTTP client and server set themselves.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host",
                        "content-length"})


class PDServe:
    """The deployment's class (``DEPLOYMENT``): one replica, since more would start
    more clusters on the same ports; scale the workers in the cluster config instead."""

    def __init__(self, config: ClusterConfig, router_http_port: int = 0) -> None:
        from pdserve.model_files import resolve_model

        port = router_http_port or _free_port(config.host)
        config = dataclasses.replace(config, launcher="ray", http_port=port,
                                     ray=dataclasses.replace(config.ray, router_resource=None))
        resolve_model(config.model)  # convert once here, before the workers race to
        self.launcher = RayLauncher(config)
        self.launcher.start()
        host = self.launcher.infos["router"]["ip"]
        # With certs the router serves HTTPS; the replica forwards as the "client" role.
        self.tls = config.tls("client")
        scheme = "https" if self.tls else "http"
        self.base = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"
        self.session: aiohttp.ClientSession | None = None
        roles = ", ".join(f"{i['role']} {i['address']} pid {i['pid']}"
                          for i in self.launcher.infos.values())
        log.info("pdserve cluster up: %s; HTTP goes on to the router's OpenAI endpoint %s",
                 roles, self.base)

    async def __call__(self, request: Request) -> Response:
        if self.session is None:  # here: it belongs to the event loop requests run on
            self.session = aiohttp.ClientSession(
                auto_decompress=False,  # bytes (and Content-Encoding) pass through as they are
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                connector=aiohttp.TCPConnector(
                    ssl=client_ssl_context(self.tls) if self.tls else True))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            upstream = await self.session.request(
                request.method, self.base + _path(request), headers=headers,
                data=await request.body(), allow_redirects=False)
        except aiohttp.ClientError as e:
            error = BadRequest(f"the pdserve router is unreachable: {e}", None, 503,
                               "unavailable", "server_error")
            return JSONResponse(error.envelope(), status_code=503)
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        if upstream.content_type != "text/event-stream":
            async with upstream:
                body = await upstream.read()
            return Response(body, status_code=upstream.status, headers=out)
        return StreamingResponse(_relay(upstream), status_code=upstream.status, headers=out)

    async def check_health(self) -> None:
        """Raises (unhealthy) once the router actor is gone."""
        await self.launcher.router.info.remote()

    def __del__(self) -> None:
        launcher = getattr(self, "launcher", None)  # None: __init__ failed (it cleaned up)
        if launcher is not None and launcher.state not in ("STOPPING", "STOPPED"):
            log.info("stopping the pdserve cluster")
            launcher.stop()
            log.info("pdserve cluster stopped")


# Not a class decorator: mypy would keep seeing the plain class.
DEPLOYMENT = serve.deployment(num_replicas=1, max_ongoing_requests=1024,
                              graceful_shutdown_timeout_s=60,
                              ray_actor_options={"num_cpus": 0})(PDServe)


async def _relay(upstream: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The router's stream, chunk by chunk. A client that goes away cancels this; closing
    the connection then makes the router cancel the request on the workers."""
    finished = False
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
        finished = True
    finally:
        if finished:
            upstream.release()
        else:
            upstream.close()


def _path(request: Request) -> str:
    """The path below the application's route prefix, with the query string."""
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    return path + (f"?{request.url.query}" if request.url.query else "")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind(("" if host in ("0.0.0.0", "::") else host, 0))
        return int(s.getsockname()[1])


def app(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``args`` are the application's ``args``. The config
    is read and checked here, so a bad one fails the deploy rather than the replica."""
    if "config" not in args or set(args) - set(ARGS):
        raise ValueError(f"deploy.ray.serve:app args: 'config' (a cluster config YAML) and "
                         f"optionally 'router_http_port'; got {sorted(args)}")
    config = ClusterConfig.from_yaml(args["config"])
    options: dict[str, Any] = {"num_cpus": 0}
    if config.ray.router_resource:
        options["resources"] = {config.ray.router_resource: 0.01}
    port = int(args.get("router_http_port") or 0)
    return DEPLOYMENT.options(ray_actor_options=options).bind(config, port)
