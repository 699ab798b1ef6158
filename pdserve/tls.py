"""TLS credentials from a ``TLSConfig`` (pdserve/config.py), for every hop.

One place turns PEM files into what each transport takes: gRPC server and channel
credentials, and ``ssl.SSLContext`` for aiohttp (the router's OpenAI HTTP, and
HTTP clients of it). ``add_port`` and ``channel`` / ``aio_channel`` are what the
roles call where they used ``add_insecure_port`` / ``insecure_channel``: plaintext
when the config is None, so one call site serves both.

Server names: ``pdserve certs`` puts ``localhost``, ``127.0.0.1`` and ``::1`` (and
every ``--host``) in each certificate's SANs, and gRPC checks IP SANs against an
IP target, so no ``grpc.ssl_target_name_override`` is set: a peer is dialled by the
name or address its certificate carries, or the handshake fails.

A missing or unreadable file raises ``ValueError`` naming it (a bad config, before
anything is served).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from pdserve.config import TLSConfig

ChannelOptions = Sequence[tuple[str, Any]]


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror}") from None


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """The certificate and key served; client certificates signed by ``tls.ca``
    required at the handshake when ``tls.require_client_cert``."""
    if tls.cert is None or tls.key is None:
        raise ValueError("tls_cert and tls_key are needed to serve TLS")
    cert, key = _read(tls.cert, "tls_cert"), _read(tls.key, "tls_key")
    assert cert is not None and key is not None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=_read(tls.ca, "tls_ca"),
                                       require_client_auth=tls.require_client_cert)


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    """Verify the server against ``tls.ca`` (the system roots when None); present our
    certificate when we have one."""
    return grpc.ssl_channel_credentials(root_certificates=_read(tls.ca, "tls_ca"),
                                        private_key=_read(tls.key, "tls_key"),
                                        certificate_chain=_read(tls.cert, "tls_cert"))


def add_port(server: grpc.Server | grpc.aio.Server, address: str,
             tls: TLSConfig | None) -> int:
    """Bind ``address`` on ``server``: TLS when ``tls`` is set, else plaintext."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def channel(address: str, tls: TLSConfig | None,
            options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to ``address``: TLS when ``tls`` is set, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, channel_credentials(tls), options=list(options))


def aio_channel(address: str, tls: TLSConfig | None,
                options: ChannelOptions = ()) -> grpc.aio.Channel:
    """The asyncio twin of ``channel``."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=list(options))


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """For an HTTPS server (aiohttp): our certificate; client certificates verified
    against ``tls.ca`` when presented, and required when ``tls.require_client_cert``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if tls.cert is None or tls.key is None:
        raise ValueError("tls_cert and tls_key are needed to serve TLS")
    _load_chain(ctx, tls)
    if tls.ca is not None:
        _load_ca(ctx, tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """For an HTTPS client: verify the server against ``tls.ca`` (hostname checked);
    present our certificate when we have one."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.ca is not None:
        _load_ca(ctx, tls.ca)
    if tls.cert is not None:
        _load_chain(ctx, tls)
    return ctx


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    _read(ca, "tls_ca")  # a clear error first
    ctx.load_verify_locations(cafile=ca)


def _load_chain(ctx: ssl.SSLContext, tls: TLSConfig) -> None:
    _read(tls.cert, "tls_cert")
    _read(tls.key, "tls_key")
    ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
