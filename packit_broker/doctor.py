"""`packit-broker check`, the I/O half: probe each endpoint layer by layer, return results.

Through an OpenShift router every misconfiguration looks alike to stock clients (py-amqp says
"Server unexpectedly closed connection", libpq "server closed the connection unexpectedly").
Here each endpoint is walked one layer at a time (DNS, TCP, TLS, certificate, then the protocol
with the real client library) and the walk stops at the first failing layer, so the result
names the layer, what was seen and the most likely fix. See docs/troubleshooting.md.

Nothing here prints or exits; `packit_broker.commands.check` renders the results.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from packit_broker.config import (
    BrokerEndpoint,
    ConfigError,
    DatabaseEndpoint,
    HostPort,
    TLSSettings,
)
from packit_broker.queues import QueueSettings
from packit_broker.router import DEFAULT_TUNNEL_TIMEOUT
from packit_broker.tls import LIBPQ_DIRECT_TLS_VERSION, amqp_ssl_options, ssl_context

Status = Literal["ok", "warn", "FAIL", "info"]

DEFAULT_TIMEOUT = 5.0
EXPIRY_WARNING_DAYS = 21
TUNNEL_TIMEOUT_SECONDS = 3600  # the router's default `timeout tunnel` (1h)
POSTGRES_ALPN = "postgresql"

#: OpenSSL's X509_V_ERR_* codes that matter here.
_CERT_HAS_EXPIRED = 10
_HOSTNAME_MISMATCH = 62

_PLAINTEXT_MARKERS = (
    "WRONG_VERSION_NUMBER",
    "wrong version number",
    "record layer failure",
    "PACKET_LENGTH_TOO_LONG",
    "packet length too long",
    "HTTP_REQUEST",
    "http request",
)


@dataclass(frozen=True)
class CheckResult:
    """One line of the report: which endpoint, which layer, how it went, and what to do."""

    name: str  # broker | database | result-backend
    endpoint: str  # display URL, never with a password
    layer: str
    status: Status
    seen: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "endpoint": self.endpoint,
            "layer": self.layer,
            "status": self.status,
            "seen": self.seen,
            "fix": self.fix,
        }


@dataclass
class _Report:
    name: str
    endpoint: str
    secrets: tuple[str, ...] = ()
    results: list[CheckResult] = field(default_factory=list)

    def _scrub(self, text: str) -> str:
        for secret in self.secrets:
            if len(secret) >= 8:
                text = text.replace(secret, "***")
            elif secret:  # short ones only as a whole word, not inside "expires"
                text = re.sub(rf"(?<![\w]){re.escape(secret)}(?![\w])", "***", text)
        return text

    def add(self, layer: str, status: Status, seen: str, fix: str = "") -> None:
        self.results.append(
            CheckResult(
                self.name, self.endpoint, layer, status, self._scrub(seen), self._scrub(fix)
            )
        )

    def ok(self, layer: str, seen: str) -> None:
        self.add(layer, "ok", seen)

    def warn(self, layer: str, seen: str, fix: str) -> None:
        self.add(layer, "warn", seen, fix)

    def info(self, layer: str, seen: str) -> None:
        self.add(layer, "info", seen)

    def fail(self, layer: str, seen: str, fix: str) -> None:
        self.add(layer, "FAIL", seen, fix)


# -- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCert:
    """What matters of a server certificate, from either `getpeercert()` or DER."""

    dns_names: tuple[str, ...]
    ip_names: tuple[str, ...]
    subject: str
    issuer: str
    not_after: datetime.datetime | None

    @property
    def names(self) -> str:
        return ", ".join((*self.dns_names, *self.ip_names)) or f"(no SAN; subject {self.subject})"

    def names_exactly(self, host: str) -> bool:
        wanted = host.lower().rstrip(".")
        return any(n.lower().rstrip(".") == wanted for n in (*self.dns_names, *self.ip_names))

    @property
    def has_wildcard(self) -> bool:
        return any(n.startswith("*.") for n in self.dns_names)

    def looks_like_router_default(self, host: str) -> bool:
        """A wildcard certificate that does not carry `host` itself: the router's own."""
        return self.has_wildcard and not self.names_exactly(host)

    def days_left(self, now: datetime.datetime | None = None) -> float | None:
        if self.not_after is None:
            return None
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.not_after - now).total_seconds() / 86400


def _rdn_text(rdns: Any) -> str:
    parts = []
    for rdn in rdns or ():
        for key, value in rdn:
            if key in ("commonName", "organizationName"):
                parts.append(f"{'CN' if key == 'commonName' else 'O'}={value}")
    return ", ".join(parts) or "?"


def peer_cert_from_dict(info: dict[str, Any]) -> PeerCert:
    """From `SSLSocket.getpeercert()` (only filled in when the chain was verified)."""
    sans = info.get("subjectAltName", ())
    not_after: datetime.datetime | None = None
    if "notAfter" in info:
        not_after = datetime.datetime.fromtimestamp(
            ssl.cert_time_to_seconds(str(info["notAfter"])), datetime.UTC
        )
    return PeerCert(
        dns_names=tuple(str(v) for k, v in sans if k == "DNS"),
        ip_names=tuple(str(v).strip() for k, v in sans if k == "IP Address"),
        subject=_rdn_text(info.get("subject")),
        issuer=_rdn_text(info.get("issuer")),
        not_after=not_after,
    )


def peer_cert_from_der(der: bytes | None) -> PeerCert | None:
    """Parse an unverified certificate; None if `cryptography` is not installed."""
    if not der:
        return None
    try:
        from cryptography import x509
        from cryptography.x509.oid import ExtensionOID, NameOID
    except ImportError:  # not a runtime dependency: degrade to OpenSSL's message only
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None

    def name_text(name: x509.Name) -> str:
        parts = [f"CN={a.value!s}" for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)]
        parts += [f"O={a.value!s}" for a in name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        return ", ".join(parts) or "?"

    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        pass
    else:
        if isinstance(san, x509.SubjectAlternativeName):
            dns = tuple(san.get_values_for_type(x509.DNSName))
            ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    return PeerCert(
        dns_names=dns,
        ip_names=ips,
        subject=name_text(cert.subject),
        issuer=name_text(cert.issuer),
        not_after=cert.not_valid_after_utc,
    )


# -- DNS, TCP, TLS ------------------------------------------------------------------------


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TlsFacts:
    """What the TLS layers learnt; the protocol layer uses it to tell router trouble apart."""

    address: tuple[str, int]
    protocol: str
    cipher: str
    sni_sent: bool
    cert: PeerCert | None
    cert_requested: bool | None  # None: could not tell
    host: str = ""

    @property
    def router_default_suspect(self) -> bool:
        return self.cert is not None and self.cert.looks_like_router_default(self.host)


def _resolve(report: _Report, dial: HostPort, timeout: float) -> tuple[str, int] | None:
    try:
        infos = socket.getaddrinfo(dial.host, dial.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        report.fail(
            "dns",
            f"cannot resolve {dial.host!r}: {exc.strerror or exc}",
            "check the host name; from a private cluster the Route host must resolve to the"
            " router (or set *_CONNECT_TO=ROUTER_ADDRESS:443 and keep the Route host in the URL)",
        )
        return None
    addresses = sorted({str(info[4][0]) for info in infos})
    report.ok("dns", f"{dial.host} -> {', '.join(addresses)}")
    return str(infos[0][4][0]), dial.port


def _tcp(report: _Report, address: tuple[str, int], timeout: float) -> bool:
    try:
        with socket.create_connection(address, timeout=timeout):
            pass
    except ConnectionRefusedError:
        report.fail(
            "tcp",
            f"connection refused by {address[0]}:{address[1]}",
            "nothing listens there: check the address and port (443 for a Route)",
        )
        return False
    except TimeoutError:
        report.fail(
            "tcp",
            f"no answer from {address[0]}:{address[1]} within {timeout:g} s",
            "a firewall/NetworkPolicy drops the packets, or the address/port is wrong",
        )
        return False
    except OSError as exc:
        report.fail("tcp", f"{address[0]}:{address[1]}: {exc}", "check the address and port")
        return False
    report.ok("tcp", f"connected to {address[0]}:{address[1]}")
    return True


@contextmanager
def _tls_socket(
    address: tuple[str, int],
    host: str,
    context: ssl.SSLContext,
    timeout: float,
) -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection(address, timeout=timeout)
    try:
        tls = context.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    try:
        yield tls
    finally:
        tls.close()


def _watch_certificate_request(context: ssl.SSLContext) -> list[bool]:
    """Note whether the server sends a CertificateRequest (CPython's debug hook; best effort)."""
    seen: list[bool] = []
    request = getattr(getattr(ssl, "_TLSMessageType", None), "CERTIFICATE_REQUEST", None)
    if request is None:
        return seen

    def callback(
        conn: object, direction: str, version: object, content: object, msg: object, data: object
    ) -> None:
        if direction == "read" and msg == request:
            seen.append(True)

    try:
        setattr(context, "_msg_callback", callback)  # noqa: B010 - private, may vanish
    except (AttributeError, TypeError):
        return seen
    seen.append(False)  # marks "watching"
    return seen


def _unverified_context(tls: TLSSettings, alpn: Sequence[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if tls.cert_file:
        with suppress(OSError, ssl.SSLError):
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return context


def _is_eof(exc: BaseException) -> bool:
    if isinstance(exc, ssl.SSLEOFError | ConnectionResetError | EOFError | BrokenPipeError):
        return True
    text = str(exc)
    return (
        "EOF" in text
        or "unexpectedly closed" in text.lower()
        or "closed the connection" in text.lower()
        or "Connection reset" in text
    )


def _plaintext_banner(address: tuple[str, int], timeout: float) -> str | None:
    """Ask a silent port something harmless in plaintext and name what answered."""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.settimeout(min(timeout, 2.0))
            sock.sendall(b"PING\r\n")
            data = sock.recv(64)
    except OSError:
        return None
    if not data:
        return None
    if data[:1] in (b"+", b"-") or b"NOAUTH" in data:
        return f"a Redis server answered ({data.splitlines()[0].decode(errors='replace')!r})"
    if data.startswith(b"HTTP/"):
        return "an HTTP server answered"
    if data.startswith(b"AMQP"):
        return "a plaintext AMQP listener answered"
    if data.startswith(b"SSH-"):
        return "an SSH server answered"
    return f"something answered in plaintext ({data[:16]!r})"


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


def _via_route(port: int, connect_to: HostPort | None) -> bool:
    return port == 443 or connect_to is not None


def _sni_fix(kind: str) -> str:
    return (
        f"put the Route host name in the URL ({kind}://USER:PASSWORD@ROUTE_HOST:443/...) and the"
        " router's address in *_CONNECT_TO: SNI is taken from the URL host, and Python never"
        " sends an IP address as SNI (py-amqp also needs `server_hostname` in its ssl dict)"
    )


def _handshake_failure(
    report: _Report,
    exc: BaseException,
    address: tuple[str, int],
    host: str,
    sni_sent: bool,
    via_route: bool,
    timeout: float,
    kind: str,
    retry: Callable[[float], None] | None = None,
) -> None:
    text = str(exc) or type(exc).__name__
    banner = _plaintext_banner(address, timeout) if isinstance(exc, TimeoutError) else None
    waited = False
    if isinstance(exc, TimeoutError) and banner is None and sni_sent and via_route and retry:
        # Silence is also what a router retrying a dead backend looks like: wait it out once.
        waited = True
        try:
            retry(max(3 * timeout, 10.0))
        except (OSError, ssl.SSLError) as again:
            if _is_eof(again):
                exc, text = again, str(again) or type(again).__name__
        else:
            report.fail(
                "tls",
                f"the TLS handshake took longer than {timeout:g} s",
                "the server or the router is overloaded, or --timeout is too short",
            )
            return
    if isinstance(exc, TimeoutError):
        report.fail(
            "tls",
            f"no TLS answer within {timeout:g} s: that port speaks plaintext"
            + (f" ({banner})" if banner else " (a TLS server answers a ClientHello at once)"),
            "point the URL/CONNECT_TO at the TLS port (the router's 443, or the server's TLS"
            " listener, e.g. 5671 for RabbitMQ)",
        )
    elif any(marker in text for marker in _PLAINTEXT_MARKERS):
        report.fail(
            "tls",
            f"{text}: that port speaks plaintext, not TLS",
            "point the URL/CONNECT_TO at the TLS port (the router's 443, or the server's TLS"
            " listener, e.g. 5671 for RabbitMQ)",
        )
    elif _is_eof(exc) and not sni_sent:
        report.fail(
            "tls",
            f"connection closed during the TLS handshake and no SNI sent (the URL host {host!r}"
            f" is an IP address): {text}",
            _sni_fix(kind),
        )
    elif (
        kind == "postgresql"
        and _is_eof(exc)
        and not waited
        and _postgres_without_direct_tls(report, text, address, host, via_route, timeout)
    ):
        pass  # closed at once (no silence first): reported as a server without direct TLS
    elif _is_eof(exc):
        server = "PostgreSQL server" if kind == "postgresql" else "broker"
        where = f"the {server} behind the Route is down (or not listening on the targetPort)"
        report.fail(
            "router",
            f"connection closed during the TLS handshake ({text}): "
            + (where if via_route else "the server closed it"),
            "check the pods behind the Route (`oc get pods`, `oc get endpoints SERVICE`), that"
            " spec.port.targetPort names the TLS port, and any"
            " haproxy.router.openshift.io/ip_allowlist annotation"
            if via_route
            else "check the server's TLS listener and its logs",
        )
    else:
        report.fail(
            "tls",
            text,
            "the TLS handshake failed: check TLS versions (1.2+) and ciphers, and a client"
            " certificate if the server requires one (*_CERT_FILE/*_KEY_FILE)",
        )


def _certificate_failure(
    report: _Report,
    exc: ssl.SSLCertVerificationError,
    cert: PeerCert | None,
    host: str,
    sni_sent: bool,
    ca_file: Path | None,
    kind: str,
) -> None:
    message = exc.verify_message or str(exc)
    ca = str(ca_file) if ca_file else "the system CA store"
    if cert is not None and cert.looks_like_router_default(host):
        described = f"{cert.names}, issued by {cert.issuer}"
        if not sni_sent:
            report.fail(
                "router",
                f"no SNI sent (the URL host {host!r} is an IP address): the router answered"
                f" with its default certificate ({described}; {message})",
                _sni_fix(kind),
            )
        else:
            report.fail(
                "router",
                f"no Route for this host: the router answered with its default certificate"
                f" ({described}; {message})",
                f"create a passthrough Route whose spec.host is exactly {host!r} (`oc get route`),"
                " or correct the host in the URL",
            )
        return
    if exc.verify_code == _CERT_HAS_EXPIRED or "expired" in message.lower():
        when = f" on {cert.not_after:%Y-%m-%d %H:%M} UTC" if cert and cert.not_after else ""
        report.fail(
            "certificate",
            f"the server certificate expired{when} ({message})",
            "renew the server certificate (cert-manager: `oc describe certificate`) and"
            " restart/reload the server",
        )
    elif exc.verify_code == _HOSTNAME_MISMATCH or "mismatch" in message.lower():
        names = cert.names if cert else "other names"
        report.fail(
            "certificate",
            f"the certificate is for {names}, not {host!r} ({message})",
            f"issue the server certificate with {host} in its subjectAltName, or use a host it"
            " names in the URL (the dial address goes in *_CONNECT_TO)",
        )
    else:
        issuer = f" (issued by {cert.issuer})" if cert else ""
        report.fail(
            "certificate",
            f"the chain does not lead to the configured CA {ca}{issuer}: {message}",
            "set *_CA_FILE to the CA that signed the server certificate",
        )


def probe_tls(
    report: _Report,
    dial: HostPort,
    tls: TLSSettings,
    *,
    port_in_url: int,
    connect_to: HostPort | None,
    alpn: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
    kind: str = "amqps",
) -> TlsFacts | None:
    """DNS, TCP, TLS and certificate layers; None when one of them failed (already reported)."""
    address = _resolve(report, dial, timeout)
    if address is None or not _tcp(report, address, timeout):
        return None
    host = tls.server_hostname
    sni_sent = not is_ip_literal(host)
    via_route = _via_route(port_in_url, connect_to)
    try:
        verified = ssl_context(tls)
    except (OSError, ssl.SSLError) as exc:
        report.fail("tls", f"cannot load the CA or client certificate: {exc}", "check *_FILE paths")
        return None
    if alpn:
        verified.set_alpn_protocols(list(alpn))
    watch = _watch_certificate_request(verified)
    try:
        with _tls_socket(address, host, verified, timeout) as sock:
            protocol, cipher = sock.version() or "?", (sock.cipher() or ("?",))[0]
            cert = peer_cert_from_dict(sock.getpeercert() or {})
    except ssl.SSLCertVerificationError as exc:
        try:
            with _tls_socket(address, host, _unverified_context(tls, alpn), timeout) as sock:
                protocol, cipher = sock.version() or "?", (sock.cipher() or ("?",))[0]
                der = sock.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError):
            protocol, cipher, der = "?", "?", None
        sni = "SNI " + host if sni_sent else "no SNI"
        report.ok("tls", f"{protocol}, {cipher} ({sni})")
        _certificate_failure(
            report, exc, peer_cert_from_der(der), host, sni_sent, tls.ca_file, kind
        )
        return None
    except (OSError, ssl.SSLError) as exc:

        def retry(longer: float) -> None:
            with _tls_socket(address, host, _unverified_context(tls, alpn), longer):
                pass

        _handshake_failure(report, exc, address, host, sni_sent, via_route, timeout, kind, retry)
        return None
    sni = f"SNI {host}" if sni_sent else "no SNI (IP address)"
    if protocol == "TLSv1.2":
        report.warn(
            "tls",
            f"{protocol}, {cipher} ({sni}): only TLS 1.2 negotiated",
            "enable TLS 1.3 on the server (RabbitMQ: ssl_options.versions.1 = tlsv1.3)",
        )
    else:
        report.ok("tls", f"{protocol}, {cipher} ({sni})")
    cert_requested = (True in watch) if watch else None
    facts = TlsFacts(address, protocol, cipher, sni_sent, cert, cert_requested, host=host)
    _certificate_ok(report, facts, host, tls)
    return facts


def _certificate_ok(report: _Report, facts: TlsFacts, host: str, tls: TLSSettings) -> None:
    cert = facts.cert
    assert cert is not None
    days = cert.days_left()
    expiry = f"; expires in {days:.0f} days" if days is not None else ""
    seen = f"verified: {cert.names} (issued by {cert.issuer}){expiry}"
    if cert.looks_like_router_default(host):
        report.warn(
            "certificate",
            f"{seen}; {host!r} matches only a wildcard: if this is the router's default"
            " certificate, no Route exists for this host",
            f"passthrough Routes hand over the server's own certificate: give it {host} in the"
            " subjectAltName, and check `oc get route`",
        )
    elif days is not None and days < EXPIRY_WARNING_DAYS:
        report.warn(
            "certificate",
            f"{seen}: under {EXPIRY_WARNING_DAYS} days left",
            "renew the server certificate soon",
        )
    else:
        report.ok("certificate", seen)
    if facts.cert_requested and not tls.cert_file:
        report.warn(
            "client-cert",
            "the server asks for a client certificate (optional for it) and none is configured",
            "fine if the server does not require one; otherwise set *_CERT_FILE and *_KEY_FILE",
        )


# -- AMQP ---------------------------------------------------------------------------------


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


def _amqp_connection_failure(
    report: _Report, exc: BaseException, endpoint: BrokerEndpoint, facts: TlsFacts | None
) -> None:
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    if name == "AccessRefused":
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
    elif isinstance(exc, TimeoutError):
        report.fail(
            "amqp",
            f"no AMQP answer: {text}",
            "the port answers TLS but not AMQP: check that the Route/Service targets the"
            " broker's AMQPS port (5671)",
        )
    elif _is_eof(exc) or name in (
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
            report.fail(
                "queue",
                f"queue {spec.name!r} exists with other arguments: {exc.reply_text}",
                "declare it exactly as the workers do (PACKIT_BROKER_QUEUE_TYPE/_MAX_PRIORITY),"
                " or drain and delete the old queue",
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


def _round_trip(report: _Report, connection: Any, timeout: float) -> None:
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
            "set PACKIT_BROKER_HEARTBEAT=60 (and broker_heartbeat in Celery) or the"
            " haproxy.router.openshift.io/timeout-tunnel annotation above the idle time",
        )
    elif heartbeat * 2 >= TUNNEL_TIMEOUT_SECONDS:
        report.warn(
            "heartbeat",
            f"heartbeat {heartbeat} s is not well below the tunnel timeout"
            f" ({DEFAULT_TUNNEL_TIMEOUT})",
            "use a heartbeat of about 60 s",
        )
    else:
        report.ok(
            "heartbeat",
            f"negotiated {heartbeat} s, well below the router's tunnel timeout"
            f" ({DEFAULT_TUNNEL_TIMEOUT})",
        )


def check_broker(
    endpoint: BrokerEndpoint, queues: QueueSettings, *, timeout: float = DEFAULT_TIMEOUT
) -> list[CheckResult]:
    """All layers of the AMQP broker, stopping at the first that fails."""
    import amqp

    report = _Report("broker", endpoint.display_url, (endpoint.password,))
    facts: TlsFacts | None = None
    if endpoint.tls is None:
        report.info("tls", "plaintext amqp:// (loopback or explicitly allowed)")
        address = _resolve(report, endpoint.dial, timeout)
        if address is None or not _tcp(report, address, timeout):
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
    connection = amqp.Connection(
        str(endpoint.dial),
        userid=endpoint.username,
        password=endpoint.password,
        virtual_host=endpoint.vhost,
        ssl=amqp_ssl_options(endpoint.tls) if endpoint.tls else False,
        connect_timeout=timeout,
        read_timeout=timeout,
        write_timeout=timeout,
        heartbeat=endpoint.heartbeat,
    )
    try:
        try:
            connection.connect()
        except (amqp.exceptions.AMQPError, OSError, EOFError) as exc:
            _amqp_connection_failure(report, exc, endpoint, facts)
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
        try:
            if not _check_queues(report, connection, queues):
                return report.results
        except (amqp.exceptions.AMQPError, OSError) as exc:
            report.fail("permission", f"{type(exc).__name__}: {exc}", "see the broker's log")
            return report.results
        _round_trip(report, connection, timeout)
    finally:
        with suppress(Exception):
            connection.close()
    return report.results


# -- PostgreSQL ---------------------------------------------------------------------------


def server_version_problem(version_num: int) -> str | None:
    """Pure: why a server of `SHOW server_version_num` cannot serve us, or None."""
    if version_num < LIBPQ_DIRECT_TLS_VERSION:
        major = version_num // 10000
        return (
            f"PostgreSQL older than 17 cannot do direct TLS (server is {major},"
            f" server_version_num {version_num})"
        )
    return None


def _postgres_failure(
    report: _Report, exc: BaseException, db: DatabaseEndpoint, facts: TlsFacts
) -> None:
    text = (str(exc) or type(exc).__name__).strip()
    lowered = text.lower()
    if "password authentication failed" in lowered or "authentication failed" in lowered:
        report.fail(
            "db-login",
            f"login refused for user {db.username!r}: {text}",
            f"wrong user name or password in {db.variable_prefix}URL",
        )
    elif "no pg_hba.conf entry" in lowered:
        report.fail(
            "db-login",
            text,
            "add a `hostssl DB USER ADDRESS scram-sha-256` line to pg_hba.conf (the router's"
            " pod network is the client address)",
        )
    elif "does not exist" in lowered and "database" in lowered:
        report.fail(
            "database",
            text,
            f"create the database ({db.dbname!r}) or correct the path of {db.variable_prefix}URL",
        )
    elif "sslnegotiation" in lowered or "invalid connection option" in lowered:
        report.fail(
            "client",
            text,
            "the libpq in use is older than 17: pip install 'psycopg2-binary>=2.9.11'",
        )
    elif "closed the connection" in lowered or "eof" in lowered or "timeout" in lowered:
        if facts.router_default_suspect and facts.cert is not None:
            report.fail(
                "router",
                f"{text}: no Route for this host: the router answered with its default"
                f" certificate ({facts.cert.names})",
                f"create a passthrough Route whose spec.host is exactly {db.host!r}",
            )
        else:
            report.fail(
                "router",
                f"{text} right after a valid TLS handshake: PostgreSQL behind the Route is down"
                " (or not listening on the Service's targetPort), or it is older than 17 and"
                " cannot do direct TLS",
                "check the PostgreSQL pods, `oc get endpoints SERVICE`, and that the server is"
                " PostgreSQL 17+ with ssl = on",
            )
    else:
        report.fail("postgresql", text, "see the PostgreSQL server log")


def check_database(
    db: DatabaseEndpoint, name: str = "database", *, timeout: float = DEFAULT_TIMEOUT
) -> list[CheckResult]:
    """PostgreSQL with direct TLS: network layers, login, version >= 17, negotiation info."""
    import psycopg2

    from packit_broker.database import connect_args

    report = _Report(name, db.display_url, (db.password,))
    facts = probe_tls(
        report,
        db.dial,
        db.tls,
        port_in_url=db.port,
        connect_to=db.connect_to,
        alpn=(POSTGRES_ALPN,),
        timeout=timeout,
        kind="postgresql",
    )
    if facts is None:
        return report.results
    try:
        args = connect_args(db)
    except ConfigError as exc:
        report.fail("client", str(exc), "see the message")
        return report.results
    try:
        conn = psycopg2.connect(
            dbname=db.dbname,
            user=db.username,
            connect_timeout=str(max(2, int(timeout))),
            application_name="packit-broker check",
            **args,
        )
    except psycopg2.Error as exc:
        _postgres_failure(report, exc, db, facts)
        return report.results
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version_num")
            row = cur.fetchone()
            version_num = int(row[0]) if row else 0
            cur.execute("SHOW server_version")
            row = cur.fetchone()
            version = str(row[0]) if row else "?"
            cur.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            ssl_row = cur.fetchone()
    except psycopg2.Error as exc:
        report.fail("postgresql", str(exc).strip(), "see the PostgreSQL server log")
        return report.results
    finally:
        conn.close()
    report.ok("db-login", f"logged in as {db.username!r} to database {db.dbname!r}")
    problem = server_version_problem(version_num)
    if problem:
        report.fail(
            "version",
            problem,
            "upgrade the server to PostgreSQL 17+ (and clients to libpq 17+); only direct TLS"
            " crosses a passthrough Route",
        )
        return report.results
    ssl_text = f", TLS {ssl_row[1]}" if ssl_row and ssl_row[0] else ", NOT TLS"
    report.ok("version", f"PostgreSQL {version} (server_version_num {version_num}){ssl_text}")
    if _via_route(db.port, db.connect_to):
        report.info(
            "negotiation",
            "direct TLS (sslnegotiation=direct) works; classic negotiation"
            " (sslnegotiation=postgres, libpq < 17 and most drivers) starts in plaintext and"
            " would not be routed through a Route",
        )
    else:
        report.info("negotiation", "direct TLS (sslnegotiation=direct) works")
    return report.results


def config_failure(name: str, exc: ConfigError) -> CheckResult:
    return CheckResult(name, exc.variable, "config", "FAIL", exc.problem, f"fix {exc.variable}")


def healthy(results: Sequence[CheckResult]) -> bool:
    return not any(result.failed for result in results)
