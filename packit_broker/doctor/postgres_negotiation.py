"""PostgreSQL's classic SSLRequest: tell a server without direct TLS from a dead backend.

The TLS layer calls this when a `postgresql` endpoint closes the connection on the ClientHello.
"""

from __future__ import annotations

import socket
import struct

from packit_broker.doctor.results import _Report

#: PostgreSQL's classic negotiation: a plaintext SSLRequest, answered by one byte, S or N.
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def _classic_postgres_answer(address: tuple[str, int], timeout: float) -> bytes | None:
    """b"S"/b"N" if a PostgreSQL answers the classic SSLRequest there, else None.

    A server older than 17 closes the connection on a direct TLS ClientHello without a word
    (it reads the record header as an absurd startup packet length) but still answers this.
    Through a router nothing answers it: plaintext without SNI is never routed to a backend.
    """
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.settimeout(min(timeout, 2.0))
            sock.sendall(_SSL_REQUEST)
            data = sock.recv(1)
    except OSError:
        return None
    return data if data in (b"S", b"N") else None


_UPGRADE_POSTGRES = (
    "upgrade the server to PostgreSQL 17+ with ssl = on (and clients to libpq 17+): only direct"
    " TLS (sslnegotiation=direct) crosses a passthrough Route; older servers start TLS only"
    " after a plaintext SSLRequest, which a router cannot route"
)


def _postgres_without_direct_tls(
    report: _Report, text: str, address: tuple[str, int], host: str, via_route: bool, timeout: float
) -> bool:
    """A PostgreSQL endpoint closed the connection at once on the ClientHello: say why."""
    answer = _classic_postgres_answer(address, timeout)
    if answer == b"S":
        report.fail(
            "postgresql",
            f"{text}: the server closed the connection on the direct TLS ClientHello but answers"
            " PostgreSQL's classic SSLRequest with 'S': it is PostgreSQL older than 17, which"
            " does not speak direct TLS",
            _UPGRADE_POSTGRES,
        )
    elif answer == b"N":
        report.fail(
            "postgresql",
            f"{text}: the server closed the connection on the direct TLS ClientHello and answers"
            " PostgreSQL's classic SSLRequest with 'N': it does not speak direct TLS (ssl = off,"
            " or PostgreSQL older than 17)",
            _UPGRADE_POSTGRES,
        )
    elif via_route:
        report.fail(
            "postgresql",
            f"{text}: the connection was closed at once on the direct TLS ClientHello (SNI"
            f" {host}): PostgreSQL behind the Route does not speak direct TLS (older than 17, or"
            " ssl = off), or no pod is behind the Route",
            _UPGRADE_POSTGRES + "; if it is 17+ with ssl = on, check the PostgreSQL pods and"
            " `oc get endpoints SERVICE`",
        )
    else:
        return False
    return True
