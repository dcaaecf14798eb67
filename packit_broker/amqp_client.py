"""py-amqp's Connection, keeping what RabbitMQ says when it blocks publishers.

RabbitMQ sends `connection.blocked` with a reason ("low on memory", "low on disk") when a
resource alarm stops it from reading publishers' sockets; py-amqp declares the method without
its argument and passes a fixed text instead. `migrate` and `check` both need the real reason
to tell a memory alarm from a disk alarm (and both from a network fault).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, ClassVar

import amqp
from amqp import spec

from packit_broker.config import BrokerEndpoint
from packit_broker.tls import amqp_ssl_options


class BlockAwareConnection(amqp.Connection):  # type: ignore[misc]
    _METHODS: ClassVar[dict[Any, Any]] = {
        **amqp.Connection._METHODS,
        spec.Connection.Blocked: spec.method(spec.Connection.Blocked, "s"),
    }

    def certificate_expiry(self) -> float | None:
        """When the server certificate verified on this connection expires (Unix time), for
        the expiry alert; None without TLS or before connecting."""
        sock = getattr(self.transport, "sock", None)
        getpeercert = getattr(sock, "getpeercert", None)
        if getpeercert is None:
            return None
        try:
            not_after = (getpeercert() or {}).get("notAfter")
        except ValueError:  # not connected (any more)
            return None
        return float(ssl.cert_time_to_seconds(str(not_after))) if not_after else None

    def _on_blocked(self, reason: str = "connection blocked") -> Any:
        if self.on_blocked:
            return self.on_blocked(reason)
        return None


def connection_name(role: str) -> str:
    """What RabbitMQ shows for our connection (`rabbitmqctl list_connections client_properties`,
    the management UI): the role, the host (the Pod's name in OpenShift) and the process, so an
    operator can tell the migrator's connection from the workers' and find the node serving it."""
    return f"packit-broker {role} on {socket.gethostname()} pid {os.getpid()}"


def open_connection(
    endpoint: BrokerEndpoint,
    *,
    role: str,
    connect_timeout: float = 10,
    on_blocked: Callable[[str], None] | None = None,
    on_unblocked: Callable[[], None] | None = None,
) -> BlockAwareConnection:
    """The one way the migrator dials RabbitMQ (publisher or consumer): the dial address (a
    `--connect-to` override), the verified TLS dict with `server_hostname` (SNI + host-name
    check, see packit_broker.tls), the heartbeat, a `connection_name` saying who we are. Not
    connected yet: call `.connect()`."""
    return BlockAwareConnection(
        str(endpoint.dial),
        userid=endpoint.username,
        password=endpoint.password,
        virtual_host=endpoint.vhost,
        ssl=amqp_ssl_options(endpoint.tls) if endpoint.tls else False,
        heartbeat=endpoint.heartbeat,
        connect_timeout=connect_timeout,
        on_blocked=on_blocked,
        on_unblocked=on_unblocked,
        client_properties={"connection_name": connection_name(role)},
    )
