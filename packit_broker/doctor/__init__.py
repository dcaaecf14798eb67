"""`packit-broker check`, the I/O half: probe each endpoint layer by layer, return results.

Through an OpenShift router every misconfiguration looks alike to stock clients (py-amqp says
"Server unexpectedly closed connection", libpq "server closed the connection unexpectedly").
Here each endpoint is walked one layer at a time (DNS, TCP, TLS, certificate, then the protocol
with the real client library) and the walk stops at the first failing layer, so the result
names the layer, what was seen and the most likely fix. See docs/troubleshooting.md.

Nothing here prints or exits; `packit_broker.commands.check` renders the results.

Modules: `results` (CheckResult, the report), `certificates` (PeerCert, certificate verdicts),
`tls_probe` (DNS, TCP, TLS, handshake failures), `postgres_negotiation` (classic SSLRequest),
`amqp_checks` (check_broker) and `postgres_checks` (check_database).
"""

from packit_broker.doctor.amqp_checks import TUNNEL_TIMEOUT_SECONDS, check_broker
from packit_broker.doctor.certificates import (
    EXPIRY_WARNING_DAYS,
    PeerCert,
    peer_cert_from_der,
    peer_cert_from_dict,
)
from packit_broker.doctor.postgres_checks import (
    POSTGRES_ALPN,
    check_database,
    server_version_problem,
)
from packit_broker.doctor.results import CheckResult, Status, config_failure, healthy
from packit_broker.doctor.tls_probe import DEFAULT_TIMEOUT, TlsFacts, is_ip_literal, probe_tls

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXPIRY_WARNING_DAYS",
    "POSTGRES_ALPN",
    "TUNNEL_TIMEOUT_SECONDS",
    "CheckResult",
    "PeerCert",
    "Status",
    "TlsFacts",
    "check_broker",
    "check_database",
    "config_failure",
    "healthy",
    "is_ip_literal",
    "peer_cert_from_der",
    "peer_cert_from_dict",
    "probe_tls",
    "server_version_problem",
]
