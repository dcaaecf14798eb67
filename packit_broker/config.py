"""Environment (or flags) -> frozen, validated endpoint values.

Everything is parsed once, at the edge, and every problem becomes one `ConfigError` that
names the variable. The I/O modules never read the environment; they take these values.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from packit_broker.queues import DEFAULT_QUEUE_NAMES, QueueSettings, QueueType

BROKER_PREFIX = "PACKIT_BROKER_"
RESULT_BACKEND_PREFIX = "PACKIT_RESULT_BACKEND_"
DATABASE_PREFIX = "PACKIT_DATABASE_"

DEFAULT_AMQPS_PORT = 5671
DEFAULT_AMQP_PORT = 5672
DEFAULT_POSTGRES_PORT = 5432
DEFAULT_HEARTBEAT = 60
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


@dataclass(frozen=True)
class HostPort:
    """An address to dial, as in curl's `--connect-to` (host may be a name or an IP)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TLSSettings:
    """What the client needs to verify the server; verification is not optional."""

    server_hostname: str
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where the AMQP broker is, who we are there, and how to verify it.

    `host`/`port` are the ones in the URL (the Route host: SNI and certificate name);
    `connect_to` optionally replaces only the address that is dialled.
    """

    host: str
    port: int
    vhost: str
    username: str
    password: str = field(repr=False)
    tls: TLSSettings | None
    connect_to: HostPort | None = None
    heartbeat: int = DEFAULT_HEARTBEAT

    @property
    def dial(self) -> HostPort:
        return self.connect_to or HostPort(self.host, self.port)

    @property
    def display_url(self) -> str:
        """The URL with the password masked, safe for logs and errors."""
        scheme = "amqps" if self.tls else "amqp"
        vhost = "" if self.vhost == "/" else self.vhost
        via = f" (via {self.connect_to})" if self.connect_to else ""
        return f"{scheme}://{self.username}:***@{self.host}:{self.port}/{vhost}{via}"


@dataclass(frozen=True)
class DatabaseEndpoint:
    """A PostgreSQL server reached with direct TLS (`sslnegotiation=direct`)."""

    host: str
    port: int
    dbname: str
    username: str
    password: str = field(repr=False)
    tls: TLSSettings
    connect_to: HostPort | None = None
    variable_prefix: str = DATABASE_PREFIX

    @property
    def dial(self) -> HostPort:
        return self.connect_to or HostPort(self.host, self.port)

    @property
    def display_url(self) -> str:
        via = f" (via {self.connect_to})" if self.connect_to else ""
        return f"postgresql://{self.username}:***@{self.host}:{self.port}/{self.dbname}{via}"


def _environ(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def parse_bool(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(name, f"expected one of 1/0, true/false, yes/no, on/off; got {raw!r}")


def parse_int(environ: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = _get(environ, name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise ConfigError(name, f"expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def parse_port(variable: str, raw: str) -> int:
    if not raw.isascii() or not raw.isdigit():
        raise ConfigError(variable, f"port must be a number from 1 to 65535, got {raw!r}")
    port = int(raw)
    if not 1 <= port <= 65535:
        raise ConfigError(variable, f"port must be from 1 to 65535, got {port}")
    return port


def parse_host_port(variable: str, raw: str) -> HostPort:
    """Parse `HOST:PORT` or `[IPv6]:PORT`."""
    text = raw.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(variable, f"expected [IPv6]:PORT, got {raw!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(variable, f"expected ADDRESS:PORT (e.g. 127.0.0.1:8443), got {raw!r}")
        if ":" in host:
            raise ConfigError(
                variable, f"put an IPv6 address in brackets: [ADDR]:PORT, got {raw!r}"
            )
    _check_hostname(variable, host)
    return HostPort(host, parse_port(variable, port_text))


def _check_hostname(variable: str, host: str) -> None:
    if not host:
        raise ConfigError(variable, "the host name is empty")
    if any(ch.isspace() or ch in "/?#@\\" or ord(ch) < 32 for ch in host):
        raise ConfigError(variable, f"invalid characters in host name {host!r}")
    if len(host) > 253:
        raise ConfigError(variable, "host name longer than 253 characters")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _readable_file(environ: Mapping[str, str], name: str) -> Path | None:
    raw = _get(environ, name)
    if raw is None:
        return None
    path = Path(raw).expanduser()
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigError(name, f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    return path


def _tls_settings(environ: Mapping[str, str], prefix: str, host: str) -> TLSSettings:
    cert = _readable_file(environ, prefix + "CERT_FILE")
    key = _readable_file(environ, prefix + "KEY_FILE")
    if key is not None and cert is None:
        raise ConfigError(
            prefix + "CERT_FILE", f"{prefix}KEY_FILE is set but the certificate is not"
        )
    return TLSSettings(
        server_hostname=host,
        ca_file=_readable_file(environ, prefix + "CA_FILE"),
        cert_file=cert,
        key_file=key,
    )


def _split_url(variable: str, raw: str) -> SplitResult:
    if any(ord(ch) < 32 or ch.isspace() for ch in raw):
        raise ConfigError(variable, "the URL contains whitespace or control characters")
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - urlsplit validates the port lazily
    except ValueError as exc:
        raise ConfigError(variable, f"malformed URL ({exc})") from None
    return parts


def _url_port(variable: str, parts: SplitResult, default: int) -> int:
    netloc_port = parts.netloc.rpartition("@")[2]
    if netloc_port.startswith("["):
        netloc_port = netloc_port.partition("]")[2]
    if ":" not in netloc_port:
        return default
    return parse_port(variable, netloc_port.rpartition(":")[2])


def _credentials(variable: str, parts: SplitResult) -> tuple[str, str]:
    if parts.username is None or parts.password is None:
        raise ConfigError(variable, "the URL needs USER:PASSWORD@ (the broker has no guest login)")
    username, password = unquote(parts.username), unquote(parts.password)
    if not username:
        raise ConfigError(variable, "the user name in the URL is empty")
    return username, password


def broker_from_env(environ: Mapping[str, str] | None = None) -> BrokerEndpoint:
    """Read `PACKIT_BROKER_*` into a `BrokerEndpoint`."""
    env = _environ(environ)
    variable = BROKER_PREFIX + "URL"
    raw = _get(env, variable)
    if raw is None:
        raise ConfigError(variable, "not set; expected amqps://USER:PASSWORD@ROUTE_HOST:443/VHOST")
    parts = _split_url(variable, raw)
    scheme = parts.scheme.lower()
    if scheme not in ("amqps", "amqp"):
        raise ConfigError(
            variable, f"scheme must be amqps:// (or amqp:// to loopback), got {scheme!r}"
        )
    if parts.query or parts.fragment:
        raise ConfigError(
            variable,
            "no ?query options: TLS settings come from PACKIT_BROKER_CA_FILE/CERT_FILE/KEY_FILE"
            " (py-amqp breaks on ?ssl_* options)",
        )
    host = parts.hostname
    if not host:
        raise ConfigError(variable, "the URL has no host")
    _check_hostname(variable, host)
    username, password = _credentials(variable, parts)
    tls = scheme == "amqps"
    port = _url_port(variable, parts, DEFAULT_AMQPS_PORT if tls else DEFAULT_AMQP_PORT)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    connect_raw = _get(env, BROKER_PREFIX + "CONNECT_TO")
    connect_to = parse_host_port(BROKER_PREFIX + "CONNECT_TO", connect_raw) if connect_raw else None
    if not tls:
        dial_host = (connect_to or HostPort(host, port)).host
        if not is_loopback(dial_host) and not parse_bool(env, BROKER_PREFIX + "ALLOW_PLAINTEXT"):
            raise ConfigError(
                variable,
                f"plaintext amqp:// to {dial_host!r} would send the password unencrypted; use"
                " amqps:// (or set PACKIT_BROKER_ALLOW_PLAINTEXT=1 if you really mean it)",
            )
    return BrokerEndpoint(
        host=host,
        port=port,
        vhost=vhost,
        username=username,
        password=password,
        tls=_tls_settings(env, BROKER_PREFIX, host) if tls else None,
        connect_to=connect_to,
        heartbeat=parse_int(env, BROKER_PREFIX + "HEARTBEAT", DEFAULT_HEARTBEAT),
    )


def queues_from_env(environ: Mapping[str, str] | None = None) -> QueueSettings:
    """Read `PACKIT_BROKER_QUEUES`, `_QUEUE_TYPE` and `_MAX_PRIORITY`."""
    env = _environ(environ)
    names_var = BROKER_PREFIX + "QUEUES"
    raw_names = _get(env, names_var)
    names = tuple(n.strip() for n in raw_names.split(",")) if raw_names else DEFAULT_QUEUE_NAMES
    for name in names:
        if not name or len(name.encode()) > 255 or any(ord(c) < 32 for c in name):
            raise ConfigError(names_var, f"invalid queue name {name!r} in {raw_names!r}")
    if len(set(names)) != len(names):
        raise ConfigError(names_var, f"a queue is listed twice in {raw_names!r}")
    type_var = BROKER_PREFIX + "QUEUE_TYPE"
    raw_type = (_get(env, type_var) or "classic").lower()
    try:
        queue_type = QueueType(raw_type)
    except ValueError:
        raise ConfigError(type_var, f"expected 'classic' or 'quorum', got {raw_type!r}") from None
    prio_var = BROKER_PREFIX + "MAX_PRIORITY"
    max_priority: int | None = None
    if _get(env, prio_var) is not None:
        max_priority = parse_int(env, prio_var, 0, minimum=1)
        if max_priority > 255:
            raise ConfigError(
                prio_var, f"RabbitMQ allows 1..255 (10 is plenty), got {max_priority}"
            )
        if queue_type is QueueType.QUORUM:
            raise ConfigError(
                prio_var, "quorum queues do not take x-max-priority; unset one of them"
            )
    return QueueSettings(names=names, queue_type=queue_type, max_priority=max_priority)


def database_from_env(
    environ: Mapping[str, str] | None = None, prefix: str = DATABASE_PREFIX
) -> DatabaseEndpoint | None:
    """Read `<prefix>URL`, `_CA_FILE`, `_CONNECT_TO` (+ client cert); None if URL unset."""
    env = _environ(environ)
    variable = prefix + "URL"
    raw = _get(env, variable)
    if raw is None:
        return None
    parts = _split_url(variable, raw)
    scheme = parts.scheme.lower()
    if scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            variable,
            f"expected postgresql://USER:PASSWORD@HOST:PORT/DB, got scheme {scheme!r}"
            " (only PostgreSQL 17+ can cross a passthrough Route, with direct TLS)",
        )
    if parts.query or parts.fragment:
        raise ConfigError(variable, "no ?query options: TLS is always verify-full + direct")
    host = parts.hostname
    if not host:
        raise ConfigError(variable, "the URL has no host")
    _check_hostname(variable, host)
    username, password = _credentials(variable, parts)
    dbname = unquote(parts.path[1:])
    if not dbname or "/" in dbname:
        raise ConfigError(variable, "the URL needs a database name: .../DBNAME")
    connect_raw = _get(env, prefix + "CONNECT_TO")
    return DatabaseEndpoint(
        host=host,
        port=_url_port(variable, parts, DEFAULT_POSTGRES_PORT),
        dbname=dbname,
        username=username,
        password=password,
        tls=_tls_settings(env, prefix, host),
        connect_to=parse_host_port(prefix + "CONNECT_TO", connect_raw) if connect_raw else None,
        variable_prefix=prefix,
    )
