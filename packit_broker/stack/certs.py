"""Throwaway PKI for the stack: a CA for the services and a separate one for the router.

The router's own wildcard certificate comes from another CA, as on a real cluster, so a
client that reaches the router's default frontend (no or unknown SNI) sees a certificate its
CA bundle does not trust.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packit_broker.stack.processes import StackError


@dataclass(frozen=True)
class ServerCert:
    cert_file: Path  # leaf + chain
    key_file: Path


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca_file: Path
    server: ServerCert  # the services' certificate: every Route host, localhost, 127.0.0.1
    router_ca_file: Path
    router_default_pem: Path  # HAProxy's `crt`: key + wildcard certificate
    client: ServerCert  # a client certificate, for mutual-TLS checks
    #: the services' CA (a trustme.CA), to issue renewed certificates (rotation tests)
    authority: Any = field(default=None, compare=False, repr=False)


def _write(cert: object, folder: Path, stem: str) -> ServerCert:
    cert_file, key_file = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert.private_key_pem.write_to_path(str(key_file))  # type: ignore[attr-defined]
    with cert_file.open("wb") as out:
        for pem in cert.cert_chain_pems:  # type: ignore[attr-defined]
            out.write(pem.bytes())
    key_file.chmod(0o600)
    return ServerCert(cert_file, key_file)


#: What to do when the stand-in's optional dependencies are missing (a plain install).
DEMO_EXTRA_FIX = "pip install 'packit-broker[demo]' (or run scripts/bootstrap.sh)"


def require_trustme() -> Any:
    """trustme, or a StackError saying how to install it (it is in the `demo` extra only)."""
    try:
        import trustme
    except ImportError:
        raise StackError(
            f"trustme not found (the stack's throwaway CAs): {DEMO_EXTRA_FIX}"
        ) from None
    return trustme


def make_pki(folder: Path, hosts: tuple[str, ...], wildcard_domain: str) -> Pki:
    trustme = require_trustme()

    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="packit-broker stack CA")
    ca_file = folder / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    server = _write(ca.issue_cert(*hosts, "localhost", "127.0.0.1"), folder, "server")
    client = _write(ca.issue_cert("packit-worker@example.test"), folder, "client")

    router_ca = trustme.CA(organization_name="ingress-operator stand-in")
    router_ca_file = folder / "router-ca.crt"
    router_ca.cert_pem.write_to_path(str(router_ca_file))
    router_cert = router_ca.issue_cert(f"*.{wildcard_domain}")
    router_pem = folder / "router-default.pem"
    with router_pem.open("wb") as out:
        out.write(router_cert.private_key_pem.bytes())
        for pem in router_cert.cert_chain_pems:
            out.write(pem.bytes())
    return Pki(folder, ca_file, server, router_ca_file, router_pem, client, authority=ca)


def issue_extra(
    folder: Path, stem: str, hosts: tuple[str, ...], *, expired: bool = False
) -> tuple[Path, ServerCert]:
    """A certificate from a fresh CA (or an expired one) for negative tests: (ca_file, cert)."""
    trustme = require_trustme()

    ca = trustme.CA(organization_name=f"packit-broker {stem} CA")
    ca_file = folder / f"{stem}-ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    if not expired:
        return ca_file, _write(ca.issue_cert(*hosts), folder, stem)
    now = datetime.datetime.now(datetime.UTC)
    cert = ca.issue_cert(
        *hosts,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    return ca_file, _write(cert, folder, stem)
