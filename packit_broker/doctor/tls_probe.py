"""DNS, TCP and TLS layers: resolve, connect, handshake, and name why a handshake failed."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from packit_broker.config import HostPort, TLSSettings
from packit_broker.doctor.certificates import (
    PeerCert,
    _certificate_failure,
    _certificate_ok,
    _sni_fix,
    peer_cert_from_der,
    peer_cert_from_dict,
)
from packit_broker.doctor.postgres_negotiation import _postgres_without_direct_tls
from packit_broker.doctor.results import _Report
from packit_broker.tls import ssl_context

DEFAULT_TIMEOUT = 5.0
#: A silent TLS handshake through a router is tried once more, this many timeouts long: what a
#: router retrying a dead backend looks like (it closes once its retries are spent).
RETRY_FACTOR = 1.2

_PLAINTEXT_MARKERS = (
    "WRONG_VERSION_NUMBER",
    "wrong version number",
    "record layer failure",
    "PACKET_LENGTH_TOO_LONG",
    "packet length too long",
    "HTTP_REQUEST",
    "http request",
)


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
    """The peer closed the connection (during or right after the handshake).

    A close right after the ClientHello is SSLZeroReturnError on Debian's CPython 3.11.2 and
    SSLEOFError on 3.11.7+: both mean the same to the user.
    """
    closed = ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError | EOFError
    if isinstance(exc, closed | BrokenPipeError):
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
            sock.settimeout(min(timeout / 4, 2.0))  # within the endpoint's deadline
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


def _chain_length(sock: ssl.SSLSocket) -> int | None:
    """How many certificates the server sent (Python 3.13+); None where Python cannot tell."""
    unverified = getattr(sock, "get_unverified_chain", None)
    if unverified is None:
        return None
    return len(unverified() or ())


def _via_route(port: int, connect_to: HostPort | None) -> bool:
    return port == 443 or connect_to is not None


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
            # Once more, as long as the endpoint's deadline allows after the first wait and
            # the plaintext probe (doctor.deadline: 1 + 1/4 + 1.2 < 2.6 timeouts).
            retry(RETRY_FACTOR * timeout)
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
    if isinstance(exc, TimeoutError) and banner is None:
        report.fail(
            "tls",
            f"silent: {address[0]}:{address[1]} accepted the connection but answered neither a"
            f" TLS ClientHello nor a plaintext probe within {timeout:g} s",
            "something takes the connection and says nothing (a router whose backend does not"
            " answer, a proxy or firewall, a hung server): check the pods behind the Route"
            " (`oc get endpoints SERVICE`) and that the URL/CONNECT_TO names the TLS port",
        )
    elif isinstance(exc, TimeoutError):
        report.fail(
            "tls",
            f"no TLS answer within {timeout:g} s: that port speaks plaintext ({banner})",
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
        chain: int | None = None
        try:
            with _tls_socket(address, host, _unverified_context(tls, alpn), timeout) as sock:
                protocol, cipher = sock.version() or "?", (sock.cipher() or ("?",))[0]
                der = sock.getpeercert(binary_form=True)
                chain = _chain_length(sock)
        except (OSError, ssl.SSLError):
            protocol, cipher, der = "?", "?", None
        sni = "SNI " + host if sni_sent else "no SNI"
        report.ok("tls", f"{protocol}, {cipher} ({sni})")
        _certificate_failure(
            report, exc, peer_cert_from_der(der), host, sni_sent, tls.ca_file, kind, chain
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
