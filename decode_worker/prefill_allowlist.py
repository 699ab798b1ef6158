"""Which prefill workers a decode worker may dial: the ``prefill_allowlist`` of its
``WorkerConfig``.

A ``DecodeRequest`` names the prefill worker to pull the prompt's KV from; without
this check any caller could make the decode worker dial any address (and hand it the
prompt). Addresses match exactly as written (``host:port``, host lowercased), so the
launcher gives the router and the decode workers the same strings.

- explicit list: only those addresses;
- ``*`` in the list: any address;
- empty: any address when the worker runs without TLS (plaintext clusters behave as
  before), none when it runs with TLS (a TLS cluster fails closed: the launchers pass
  the prefill pool, see pdserve/cluster_config.py).
"""

from __future__ import annotations

from pdserve.config import WorkerConfig


def _normal(address: str) -> str:
    host, _, port = address.strip().rpartition(":")
    return f"{host.lower()}:{port}"


class PrefillAllowlist:
    def __init__(self, addresses: tuple[str, ...], tls: bool) -> None:
        self.any = "*" in addresses or (not addresses and not tls)
        self.addresses = frozenset(_normal(a) for a in addresses if a != "*")

    @classmethod
    def of(cls, config: WorkerConfig) -> PrefillAllowlist:
        return cls(config.prefill_allowlist, config.tls is not None)

    def permits(self, address: str) -> bool:
        return self.any or _normal(address) in self.addresses
