"""The AMQP layers: login, vhost, heartbeat, queues and permissions, a round trip."""

from __future__ import annotations

import functools
import socket
import ssl
import struct
import time
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from packit_broker import errors
from packit_broker.amqp_client import BlockAwareConnection
from packit_broker.config import DEFAULT_HEARTBEAT, BrokerEndpoint, TLSSettings
from packit_broker.doctor.results import CheckResult, _Report
from packit_broker.doctor.tls_probe import (
    _PLAINTEXT_MARKERS,
    DEFAULT_TIMEOUT,
    TlsFacts,
    _is_eof,
    _resolve,
    _tcp,
    _tls_socket,
    probe_tls,
)
from packit_broker.queues import REPLICAS_SERVER_PROPERTY, QueueSettings, QueueType
from packit_broker.router import DEFAULT_TUNNEL_TIMEOUT
from packit_broker.tls import amqp_ssl_options, ssl_context

TUNNEL_TIMEOUT_SECONDS = 3600  # the router's default `timeout tunnel` (1h)

#: AMQP 0-9-1's frame types (method, content header, content body, heartbeat).
AMQP_FRAME_TYPES = frozenset({1, 2, 3, 8})


class ImpossibleFrame(OSError):
    """A frame header no AMQP server sends: garbage, or another protocol, behind the port."""

    def __init__(self, header: bytes, limit: int) -> None:
        frame_type, _, size = struct.unpack(">BHI", header)
        self.header = header
        why = (
            f"frame type {frame_type} (AMQP has 1, 2, 3 and 8)"
            if frame_type not in AMQP_FRAME_TYPES
            else f"a frame of {size} bytes (this client allows {limit})"
        )
        super().__init__(f"the server announced {why}; its first bytes: {header.hex(' ')}")


class _FrameGuard:
    """Refuses an impossible frame at its 7-byte header, instead of waiting for gigabytes."""

    __slots__ = ()
    FRAME_LIMIT = 131072  # py-amqp's frame_max: what this client offers, so a ceiling

    def read_frame(self, unpack: Any = struct.unpack) -> Any:
        transport: Any = self  # py-amqp's transport, which this class is mixed into
        header = transport._read(7, True)
        frame_type, _, size = unpack(">BHI", header)
        if frame_type not in AMQP_FRAME_TYPES or size > self.FRAME_LIMIT:
            raise ImpossibleFrame(header, self.FRAME_LIMIT)
        transport._read_buffer = header + transport._read_buffer  # read again, as py-amqp does
        return super().read_frame(unpack)  # type: ignore[misc]


_GUARDED: dict[type, type] = {}


def _guarded(transport_class: type) -> type:
    """`transport_class` with the frame guard first (same slots: its instances can switch)."""
    if transport_class not in _GUARDED:
        _GUARDED[transport_class] = type(
            f"Guarded{transport_class.__name__}", (_FrameGuard, transport_class), {"__slots__": ()}
        )
    return _GUARDED[transport_class]


class _CheckedConnection(BlockAwareConnection):
    """The connection `check` logs in with: its transport refuses impossible frames."""

    def Transport(self, *args: Any, **kwargs: Any) -> Any:
        transport = super().Transport(*args, **kwargs)
        transport.__class__ = _guarded(type(transport))
        return transport


def _http_status(facts: TlsFacts, tls: TLSSettings) -> str | None:
    """The status line of an HTTP server behind the same TLS endpoint (router default page)."""
    try:
        context = ssl_context(tls)
        with _tls_socket(facts.address, tls.server_hostname, context, DEFAULT_TIMEOUT) as sock:
            request = f"GET / HTTP/1.1\r\nHost: {tls.server_hostname}\r\nConnection: close\r\n\r\n"
            sock.sendall(request.encode())
            data = sock.recv(256)
    except (OSError, ssl.SSLError):
        return None
    if not data.startswith(b"HTTP/"):
        return None
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def _speaks_tls(address: tuple[str, int], timeout: float) -> bool:
    """Whether a TLS server answers a ClientHello there (nothing is verified: only asked)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(address, timeout=timeout) as raw, context.wrap_socket(raw):
            return True
    except ssl.SSLError as exc:  # a TLS alert is still TLS; a plaintext answer is not
        return not any(marker in str(exc) for marker in _PLAINTEXT_MARKERS) and not _is_eof(exc)
    except OSError:
        return False


def _amqp_connection_failure(
    report: _Report,
    exc: BaseException,
    endpoint: BrokerEndpoint,
    facts: TlsFacts | None,
    plain_address: tuple[str, int] | None = None,
) -> None:
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    # A TLS alert or an HTTP page read as a frame header is an impossible frame too; those
    # have better names (a TLS port, the router's default backend) than "not AMQP".
    cut = _is_eof(exc) or isinstance(exc, ImpossibleFrame)
    if plain_address is not None and cut and _speaks_tls(plain_address, DEFAULT_TIMEOUT):
        report.fail(
            "tls",
            f"{text}: the URL says amqp:// (plaintext) but {plain_address[0]}:{plain_address[1]}"
            " speaks TLS (it completed a TLS handshake)",
            "use amqps:// in PACKIT_BROKER_URL (with PACKIT_BROKER_CA_FILE); the broker is up",
        )
    elif name == "AccessRefused":
        report.fail(
            "amqp-login",
            f"login refused for user {endpoint.username!r}: {text}",
            "wrong user name or password in PACKIT_BROKER_URL (percent-encode special"
            " characters); check the user exists (`rabbitmqctl list_users`)",
        )
    elif name in ("NotAllowed", "ConnectionForced") and "vhost" in text.lower():
        report.fail(
            "vhost",
            f"vhost {endpoint.vhost!r}: {text}",
            "the vhost is missing or the user has no access to it: create it"
            f" (`rabbitmqctl add_vhost {endpoint.vhost}`) and grant permissions"
            f" (`rabbitmqctl set_permissions -p {endpoint.vhost} {endpoint.username} ...`), or"
            " correct the URL path (`/` is written as an empty path)",
        )
    elif (
        isinstance(exc, ImpossibleFrame)
        and not exc.header.startswith(b"HTTP/")
        and not (facts is not None and facts.router_default_suspect)
    ):
        report.fail(
            "amqp",
            f"{text}: what answers behind this TLS endpoint is not an AMQP broker",
            "point the Route's spec.port.targetPort (or *_CONNECT_TO) at RabbitMQ's AMQPS port"
            " (5671); `oc get endpoints SERVICE` shows what the Service reaches",
        )
    elif isinstance(exc, TimeoutError):
        report.fail(
            "amqp",
            f"no AMQP answer: {text}",
            "the port answers TLS but not AMQP: check that the Route/Service targets the"
            " broker's AMQPS port (5671)",
        )
    elif cut or name in (
        "UnexpectedFrame",
        "FrameSyntaxError",
        "RecoverableConnectionError",
    ):
        http = _http_status(facts, endpoint.tls) if facts and endpoint.tls else None
        if facts is not None and facts.router_default_suspect and facts.cert is not None:
            answered = f"; an HTTP server answers there: {http!r}" if http else ""
            report.fail(
                "router",
                f"{text} after a TLS handshake with a wildcard certificate ({facts.cert.names},"
                f" issued by {facts.cert.issuer}): no Route for this host: the router answered"
                f" with its default certificate{answered}",
                f"create a passthrough Route whose spec.host is exactly {endpoint.host!r}"
                " (`oc get route`), or correct the host in the URL",
            )
        else:
            report.fail(
                "router",
                f"{text} right after a valid TLS handshake: the broker behind the Route is down"
                " (or not listening on the Service's targetPort)",
                "check the broker pods and `oc get endpoints SERVICE`; the Route's"
                " spec.port.targetPort must name the AMQPS port",
            )
    else:
        report.fail("amqp", f"{name}: {text}", "see the broker's log for this connection")


def _cluster(report: _Report, server_properties: Mapping[str, Any], queues: QueueSettings) -> None:
    """Classic queues on a cluster: each lives on one node, so its tasks are unreachable while
    that node is down (and gone with its volume). Known only from the bundled template's
    server property: AMQP tells a client nothing about other nodes."""
    raw = server_properties.get(REPLICAS_SERVER_PROPERTY)
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    try:
        replicas = int(str(raw))
    except ValueError:
        return  # not the bundled template (or an older one): nothing known
    # The template's parameter as the node read it at boot, not a live count of nodes up.
    deployed = f"RabbitMQ deployed with REPLICAS={replicas}"
    if replicas <= 1:
        report.info("cluster", f"{deployed}: one node, no replication to check")
    elif queues.queue_type is QueueType.CLASSIC:
        report.warn(
            "cluster",
            f"{deployed} (several nodes), but the queues are classic"
            " (PACKIT_BROKER_QUEUE_TYPE=classic): a classic queue lives on one node, its tasks"
            " are unreachable while that node is down and lost with its volume",
            "set PACKIT_BROKER_QUEUE_TYPE=quorum for workers, producers and the bridge (a quorum"
            " queue is replicated on up to quorum_cluster_size nodes, 3 by default); an"
            " existing classic queue must be drained and deleted first (RabbitMQ refuses to"
            " redeclare it), see docs/deploy.md",
        )
    else:
        report.ok("cluster", f"{deployed}; the queues are quorum queues (replicated)")


def _check_queues(report: _Report, connection: Any, queues: QueueSettings) -> bool:
    import amqp

    for spec in queues.specs:
        existed = True
        channel = connection.channel()
        try:
            _, messages, consumers = channel.queue_declare(spec.name, passive=True)
        except amqp.exceptions.NotFound:
            existed = False
        else:
            with suppress(Exception):
                channel.close()
        channel = connection.channel()
        try:
            spec.declare(channel)
        except amqp.exceptions.AccessRefused as exc:
            report.fail(
                "permission",
                f"no permission on queue {spec.name!r}: {exc.reply_text}",
                f"grant the user configure, write and read on {spec.name!r} and its exchange"
                " (`rabbitmqctl set_permissions -p VHOST USER CONF WRITE READ`)",
            )
            return False
        except amqp.exceptions.PreconditionFailed as exc:
            text = str(exc.reply_text or exc)
            existing = errors.existing_arguments(
                functools.partial(_redeclare, connection, spec.name),
                spec.arguments,
                text,
            )
            report.diagnosed(
                errors.queue_mismatch(report.endpoint, spec.name, spec.arguments, existing, text)
            )
            return False
        with suppress(Exception):
            channel.close()
        if existed:
            report.ok(
                "permission", f"queue {spec.name!r}: {messages} messages, {consumers} consumers"
            )
        else:
            report.ok("permission", f"queue {spec.name!r} declared (it did not exist yet)")
    return True


def _redeclare(connection: Any, queue: str, arguments: Mapping[str, Any]) -> None:
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False, arguments=dict(arguments) or None)
    with suppress(Exception):
        channel.close()


def _round_trip(
    report: _Report, connection: Any, timeout: float, blocked: list[tuple[str, float]]
) -> None:
    import amqp

    channel = connection.channel()
    try:
        queue, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
    except amqp.exceptions.AccessRefused as exc:
        report.warn(
            "round-trip",
            f"skipped: cannot create a temporary server-named queue ({exc.reply_text})",
            "grant configure on ^amq\\.gen-.* to test publishing, or ignore",
        )
        return
    received: list[float] = []
    start = time.monotonic()
    try:
        channel.basic_publish_confirm(
            amqp.Message(b"packit-broker check", content_type="text/plain"),
            exchange="",
            routing_key=queue,
            confirm_timeout=timeout,
        )
        confirmed = time.monotonic()
        channel.basic_consume(
            queue, callback=lambda message: received.append(time.monotonic()), no_ack=True
        )
        deadline = start + timeout
        while not received and time.monotonic() < deadline:
            with suppress(TimeoutError):
                connection.drain_events(timeout=max(0.05, deadline - time.monotonic()))
    except (amqp.exceptions.AMQPError, OSError) as exc:
        if blocked:
            reason, since = blocked[-1]
            report.diagnosed(errors.blocked(report.endpoint, reason, time.monotonic() - since))
            return
        report.fail(
            "round-trip",
            f"{type(exc).__name__}: {exc}",
            "publishing or consuming failed: see the broker's log (memory/disk alarms block"
            " publishers)",
        )
        return
    if not received:
        report.fail(
            "round-trip",
            f"published (confirmed) but nothing came back within {timeout:g} s",
            "see the broker's log",
        )
        return
    report.ok(
        "round-trip",
        f"publish confirmed in {(confirmed - start) * 1000:.1f} ms, consumed after"
        f" {(received[0] - start) * 1000:.1f} ms (temporary queue)",
    )
    with suppress(Exception):
        channel.close()


def _heartbeat(report: _Report, connection: Any) -> None:
    heartbeat = int(connection.heartbeat or 0)
    if heartbeat == 0:
        report.warn(
            "heartbeat",
            "heartbeat 0 (off): an idle connection is cut by the router after its tunnel"
            f" timeout ({DEFAULT_TUNNEL_TIMEOUT}) without anyone noticing",
            f"set PACKIT_BROKER_HEARTBEAT={DEFAULT_HEARTBEAT} (the default; celery_config() sets"
            " broker_heartbeat from it) or the"
            " haproxy.router.openshift.io/timeout-tunnel annotation above the idle time",
        )
    elif heartbeat * 2 >= TUNNEL_TIMEOUT_SECONDS:
        report.warn(
            "heartbeat",
            f"heartbeat {heartbeat} s is not well below the tunnel timeout"
            f" ({DEFAULT_TUNNEL_TIMEOUT})",
            f"use a heartbeat of about {DEFAULT_HEARTBEAT} s (PACKIT_BROKER_HEARTBEAT)",
        )
    else:
        report.ok(
            "heartbeat",
            f"negotiated {heartbeat} s, well below the router's tunnel timeout"
            f" ({DEFAULT_TUNNEL_TIMEOUT})",
        )


def check_broker(
    endpoint: BrokerEndpoint,
    queues: QueueSettings,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    results: list[CheckResult] | None = None,
) -> list[CheckResult]:
    """All layers of the AMQP broker, stopping at the first that fails.

    Each result is appended to `results` (when given) as soon as its layer is done, so that a
    caller with a deadline (`doctor.deadline`) has the layers that passed."""
    import amqp

    report = _Report(
        "broker", endpoint.display_url, (endpoint.password,), [] if results is None else results
    )
    facts: TlsFacts | None = None
    plain_address: tuple[str, int] | None = None
    if endpoint.tls is None:
        report.info("tls", "plaintext amqp:// (loopback or explicitly allowed)")
        plain_address = _resolve(report, endpoint.dial, timeout)
        if plain_address is None or not _tcp(report, plain_address, timeout):
            return report.results
    else:
        facts = probe_tls(
            report,
            endpoint.dial,
            endpoint.tls,
            port_in_url=endpoint.port,
            connect_to=endpoint.connect_to,
            timeout=timeout,
            kind="amqps",
        )
        if facts is None:
            return report.results
    blocked: list[tuple[str, float]] = []
    connection = _CheckedConnection(
        str(endpoint.dial),
        userid=endpoint.username,
        password=endpoint.password,
        virtual_host=endpoint.vhost,
        ssl=amqp_ssl_options(endpoint.tls) if endpoint.tls else False,
        connect_timeout=timeout,
        read_timeout=timeout,
        write_timeout=timeout,
        heartbeat=endpoint.heartbeat,
        on_blocked=lambda reason: blocked.append((reason, time.monotonic())),
    )
    try:
        try:
            connection.connect()
        except (amqp.exceptions.AMQPError, OSError, EOFError) as exc:
            _amqp_connection_failure(report, exc, endpoint, facts, plain_address)
            return report.results
        product = connection.server_properties.get("product", b"")
        version = connection.server_properties.get("version", b"")
        if isinstance(product, bytes):
            product = product.decode(errors="replace")
        if isinstance(version, bytes):
            version = version.decode(errors="replace")
        report.ok("amqp-login", f"logged in as {endpoint.username!r} ({product} {version})")
        report.ok("vhost", f"vhost {endpoint.vhost!r} open")
        _heartbeat(report, connection)
        _cluster(report, connection.server_properties, queues)
        try:
            if not _check_queues(report, connection, queues):
                return report.results
        except (amqp.exceptions.AMQPError, OSError) as exc:
            report.fail("permission", f"{type(exc).__name__}: {exc}", "see the broker's log")
            return report.results
        _round_trip(report, connection, timeout, blocked)
    finally:
        with suppress(Exception):
            connection.close()
    return report.results
