"""The one place that turns `TLSSettings` into what each client library wants.

Each client has its own trap (see docs/usage.md): py-amqp only sends SNI and checks the host
name when its ssl *dict* carries `server_hostname` and silently ignores an SSLContext; libpq
only crosses a passthrough Route with `sslnegotiation=direct`. All three builders here verify
the chain and the host name, send SNI, and refuse anything below TLS 1.2.
"""

from __future__ import annotations

import ssl
from typing import Any

from packit_broker.config import ConfigError, DatabaseEndpoint, TLSSettings

MINIMUM_TLS = ssl.TLSVersion.TLSv1_2
LIBPQ_DIRECT_TLS_VERSION = 170000


def ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A client context: chain and host name verified, TLS 1.2+, optional client cert."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    context.minimum_version = MINIMUM_TLS
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.cert_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return context


def amqp_ssl_options(tls: TLSSettings) -> dict[str, Any]:
    """py-amqp's ssl dict (Celery's `broker_use_ssl`); `server_hostname` turns on SNI + check."""
    options: dict[str, Any] = {
        "server_hostname": tls.server_hostname,
        "cert_reqs": ssl.CERT_REQUIRED,
        "tls_minimum_version": MINIMUM_TLS,
    }
    if tls.ca_file:
        options["ca_certs"] = str(tls.ca_file)
    if tls.cert_file:
        options["certfile"] = str(tls.cert_file)
        if tls.key_file:
            options["keyfile"] = str(tls.key_file)
    return options


def libpq_version() -> int:
    import psycopg2

    return int(psycopg2.__libpq_version__)


def libpq_parameters(db: DatabaseEndpoint, hostaddr: str | None = None) -> dict[str, str]:
    """libpq keywords for verify-full direct TLS; `hostaddr` dials elsewhere, keeping SNI=host."""
    version = libpq_version()
    if version < LIBPQ_DIRECT_TLS_VERSION:
        raise ConfigError(
            db.variable_prefix + "URL",
            f"the libpq in use is {version // 10000}.{version % 10000}; direct TLS through a"
            " Route needs libpq 17+ (pip install 'psycopg2-binary>=2.9.11')",
        )
    params = {
        "host": db.host,
        "port": str(db.dial.port),
        "sslmode": "verify-full",
        "sslnegotiation": "direct",
        "sslsni": "1",
        "ssl_min_protocol_version": "TLSv1.2",
        "sslrootcert": str(db.tls.ca_file) if db.tls.ca_file else "system",
    }
    if hostaddr is not None:
        params["hostaddr"] = hostaddr
    if db.tls.cert_file:
        params["sslcert"] = str(db.tls.cert_file)
        if db.tls.key_file:
            params["sslkey"] = str(db.tls.key_file)
    return params
