"""Errors as values: which layer failed, what was seen, and the most likely fix.

Through a router every misconfiguration looks alike to stock clients ("Server unexpectedly
closed connection"); this module turns the exception plus what we know about the endpoint into
a diagnosis. The library raises, the CLI renders `Failure`s.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    layer: str  # dns | tcp | tls | certificate | router | amqp-login | permission | ...
    endpoint: str  # display form, never with a password
    seen: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.layer}] {self.endpoint}: {self.seen}\n  fix: {self.fix}"


def _cert_failure(exc: ssl.SSLCertVerificationError, endpoint: str, host: str) -> Failure:
    message = exc.verify_message or str(exc)
    if exc.verify_code == 62 or "hostname mismatch" in message.lower():
        fix = (
            f"the server certificate does not name {host!r}: issue it with {host} in its SAN"
            " (or use the Route host in the URL)"
        )
    elif exc.verify_code == 10 or "expired" in message.lower():
        fix = "the server certificate has expired: renew it (cert-manager: check the Certificate)"
    else:
        fix = (
            "the certificate chain does not lead to the CA you trust: set *_CA_FILE to the CA"
            " that signed the server certificate; if this is the router's own certificate, no"
            f" Route exists for {host!r} (check `oc get route` and the SNI host)"
        )
    return Failure("certificate", endpoint, message, fix)


def classify_connect_error(exc: BaseException, endpoint: str, host: str) -> Failure:
    """A failed AMQP/Redis/PostgreSQL connection attempt -> the layer and a fix."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return Failure("dns", endpoint, text, "check the host name, or set *_CONNECT_TO")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _cert_failure(exc, endpoint, host)
    if isinstance(exc, ConnectionRefusedError):
        return Failure(
            "tcp", endpoint, text, "nothing listens there: check the address/port (443 for a Route)"
        )
    if isinstance(exc, ssl.SSLError):
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return Failure(
                "tls", endpoint, text, "the port speaks plaintext: use the TLS port (5671 / 443)"
            )
        return Failure("tls", endpoint, text, "TLS handshake failed: check TLS versions/ciphers")
    if isinstance(exc, TimeoutError | socket.timeout):
        return Failure("tcp", endpoint, text, "no answer: a firewall, or the wrong address/port")
    name = type(exc).__name__
    if name == "AccessRefused" and "login was refused" in text.lower():
        return Failure("amqp-login", endpoint, text, "wrong user name or password")
    if name == "AccessRefused":
        return Failure(
            "permission",
            endpoint,
            text,
            "the user lacks configure/write permission on these queues or exchanges: grant it"
            " (rabbitmqctl set_permissions) or choose the queues with --queue",
        )
    if name in ("NotAllowed", "ConnectionForced") and "vhost" in text.lower():
        return Failure(
            "permission", endpoint, text, "the vhost does not exist or the user has no access to it"
        )
    if name == "AuthenticationError" or "NOAUTH" in text or "WRONGPASS" in text:
        return Failure("redis", endpoint, text, "wrong Redis password in the --from URL")
    if "unexpectedly closed" in text.lower() or isinstance(exc, ConnectionResetError | EOFError):
        return Failure(
            "router",
            endpoint,
            text,
            "the TLS session ended before AMQP started: the broker behind the Route is down, or"
            " the client sent no SNI (run `packit-broker check`)",
        )
    return Failure("connection", endpoint, f"{name}: {text}", "run `packit-broker check`")
