"""``pdserve certs DIR``: a development CA and one certificate per role, for mTLS.

Writes into DIR (created 0700 if missing)::

    ca.pem  ca-key.pem                      the CA (keep ca-key.pem off the workers)
    router.pem  router-key.pem              each role: serverAuth + clientAuth
    prefill.pem prefill-key.pem
    decode.pem  decode-key.pem
    client.pem  client-key.pem              clients of the public API, launchers' probes

Keys are ECDSA P-256, written 0600. Every certificate's SANs are ``localhost``,
``127.0.0.1``, ``::1`` and each ``--host`` (an IP address becomes an IP SAN, anything
else a DNS SAN: Kubernetes Service names, node IPs). Refuses to overwrite an
existing file unless ``force``. For development and tests: production sites bring
certificates from their own CA (the roles only read PEM files).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pdserve.config import TLSConfig

ROLES: tuple[str, ...] = ("router", "prefill", "decode", "client")
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


@dataclass(frozen=True)
class CertFiles:
    """Where ``pdserve certs`` put a role's files in DIR."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def cert(self, role: str) -> Path:
        return self.directory / f"{role}.pem"

    def key(self, role: str) -> Path:
        return self.directory / f"{role}-key.pem"

    def tls(self, role: str, require_client_cert: bool = True) -> TLSConfig:
        """The TLSConfig of ``role`` from this directory."""
        return TLSConfig(ca=str(self.ca), cert=str(self.cert(role)), key=str(self.key(role)),
                         require_client_cert=require_client_cert)

    def all_paths(self) -> list[Path]:
        return [self.ca, self.directory / "ca-key.pem",
                *(p for r in ROLES for p in (self.cert(r), self.key(r)))]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pdserve"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _sans(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):  # ordered, once each
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _builder(subject: x509.Name, issuer: x509.Name,
             key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def make_ca(common_name: str = "pdserve development CA") -> tuple[x509.Certificate,
                                                                 ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name(common_name), _name(common_name), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(role: str, hosts: Iterable[str], ca: x509.Certificate,
              ca_key: ec.EllipticCurvePrivateKey) -> tuple[x509.Certificate,
                                                           ec.EllipticCurvePrivateKey]:
    """A certificate for ``role``, signed by ``ca``; clients get clientAuth only."""
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role != "client":
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (_builder(_name(f"pdserve-{role}"), ca.subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(_sans(hosts), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # an existing file (--force) keeps no wider mode
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_certs(directory: str | Path, hosts: Iterable[str] = (),
                force: bool = False) -> CertFiles:
    """Make the CA and every role's certificate in ``directory``; ``ValueError`` when a
    file is already there and not ``force``."""
    files = CertFiles(Path(directory))
    existing = [str(p) for p in files.all_paths() if p.exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} already exists (and {len(existing) - 1} more); "
                         "pass --force to replace every certificate and key")
    files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca, ca_key = make_ca()
    _write(files.ca, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.directory / "ca-key.pem", _key_pem(ca_key), 0o600)
    all_hosts = [*DEFAULT_HOSTS, *hosts]
    for role in ROLES:
        cert, key = make_leaf(role, all_hosts, ca, ca_key)
        _write(files.cert(role), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(files.key(role), _key_pem(key), 0o600)
    return files
