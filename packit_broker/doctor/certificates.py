"""Server certificates: `PeerCert` from either form, and the verdicts on the certificate layer."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packit_broker.config import TLSSettings
from packit_broker.doctor.results import _Report

if TYPE_CHECKING:
    from packit_broker.doctor.tls_probe import TlsFacts


EXPIRY_WARNING_DAYS = 21

#: OpenSSL's X509_V_ERR_* codes that matter here.
_CERT_HAS_EXPIRED = 10
_HOSTNAME_MISMATCH = 62
_NO_LOCAL_ISSUER = 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY


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


def _sni_fix(kind: str) -> str:
    return (
        f"put the Route host name in the URL ({kind}://USER:PASSWORD@ROUTE_HOST:443/...) and the"
        " router's address in *_CONNECT_TO: SNI is taken from the URL host, and Python never"
        " sends an IP address as SNI (py-amqp also needs `server_hostname` in its ssl dict)"
    )


def _certificate_failure(
    report: _Report,
    exc: ssl.SSLCertVerificationError,
    cert: PeerCert | None,
    host: str,
    sni_sent: bool,
    ca_file: Path | None,
    kind: str,
    chain: int | None = None,
) -> None:
    """Name why verification failed. `chain`: how many certificates the server sent, when
    known (a lone leaf whose issuer is not in the CA file: a missing intermediate, or a root
    the client does not have)."""
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
    elif exc.verify_code == _NO_LOCAL_ISSUER and chain == 1:
        # A lone certificate: issued by an intermediate the server does not send, or by a root
        # the CA file lacks (a rotated CA); nothing on the wire tells which.
        issuer = cert.issuer if cert else "an unknown issuer"
        report.fail(
            "certificate",
            f"the server sent only its own certificate, issued by {issuer}, and that issuer is"
            f" not in {ca} ({message})",
            "if that issuer is a root (a new or rotated CA), set *_CA_FILE to it (a bundle with"
            " the old and the new CA during a rotation); if it is an intermediate, fix the"
            " server's chain: tls.crt = the server certificate followed by the intermediate(s)",
        )
    elif exc.verify_code == _NO_LOCAL_ISSUER:
        issuer = f", issued by {cert.issuer}," if cert else ""
        report.fail(
            "certificate",
            f"the server certificate{issuer} does not lead to the configured CA {ca} ({message})",
            "either set *_CA_FILE to the CA that signed it, or, if its issuer is an"
            " intermediate of that CA, make the server send it: tls.crt = the server"
            " certificate followed by the intermediate(s)",
        )
    else:
        issuer = f" (issued by {cert.issuer})" if cert else ""
        report.fail(
            "certificate",
            f"the chain does not lead to the configured CA {ca}{issuer}: {message}",
            "set *_CA_FILE to the CA that signed the server certificate",
        )


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
