"""Environment (or flags) -> frozen, validated endpoint values.

Everything is parsed once, at the edge, and every problem becomes one `ConfigError` that
names the variable. The I/O modules never read the environment; they take these values.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from packit_broker.queues import DEFAULT_QUEUE_NAMES, QueueSettings, QueueType

BROKER_PREFIX = "PACKIT_BROKER_"
RESULT_BACKEND_PREFIX = "PACKIT_RESULT_BACKEND_"
DATABASE_PREFIX = "PACKIT_DATABASE_"
MIGRATE_FROM_VARIABLE = "PACKIT_MIGRATE_FROM"
MIGRATE_TO_VARIABLE = "PACKIT_MIGRATE_TO"  # the Redis a rollback writes to

DEFAULT_AMQPS_PORT = 5671
DEFAULT_AMQP_PORT = 5672
DEFAULT_POSTGRES_PORT = 5432
DEFAULT_REDIS_PORT = 6379
#: AMQP heartbeat (s); why 10: packit_broker.recovery (a cut node noticed in 20-25 s).
DEFAULT_HEARTBEAT = 10
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
    if not raw.isascii() or not raw.isdigit() or len(raw) > 5:
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


def _check_hostname(variable: str, host: str, *, show: bool = True) -> None:
    """`show=False` for a host taken from a URL: a mangled URL may hold a password there."""
    if not host:
        raise ConfigError(variable, "the host name is empty")
    if any(ch.isspace() or ch in "/?#@\\" or ord(ch) < 32 for ch in host):
        shown = f" {host!r}" if show else ""
        raise ConfigError(variable, f"invalid characters in host name{shown}")
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


#: Schemes worth naming back when a URL has the wrong one; anything else is not echoed, since a
#: mangled URL can put part of a password where the scheme should be.
KNOWN_SCHEMES = frozenset(
    {"amqp", "amqps", "redis", "rediss", "unix", "postgres", "postgresql", "http", "https"}
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")

ENCODE_HINT = (
    "percent-encode the user name and password (/ %2F, ? %3F, # %23, @ %40, : %3A, % %25,"
    " space %20), e.g. python3 -c 'import urllib.parse, getpass;"
    ' print(urllib.parse.quote(getpass.getpass(), safe=""))\''
)


@dataclass(frozen=True)
class UrlParts:
    """A URL split by hand, never by `urlsplit`: no part of it is ever put into an error.

    `urlsplit` ends the authority at the first `/`, `?` or `#`, so an unencoded one inside a
    password turns the rest of the password into the "port" (and `.port` then raises
    `Port could not be cast to integer value as '<part of the password>'`), the host or the
    path. Here a URL that cannot be split without guessing is refused with a fixed message.
    """

    scheme: str
    username: str | None
    password: str | None = field(repr=False)
    host: str
    port: int | None
    path: str
    query: str


def split_secret_url(variable: str, raw: str, expected: str) -> UrlParts:
    """Split `SCHEME://[USER[:PASSWORD]@]HOST[:PORT][/PATH][?QUERY]` without echoing any of it.

    `expected` is the example shown when the URL is not of that shape.
    """
    if any(ord(ch) < 32 or ord(ch) == 127 or ch.isspace() for ch in raw):
        raise ConfigError(
            variable, f"the URL contains whitespace or control characters; {ENCODE_HINT}"
        )
    scheme, sep, rest = raw.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ConfigError(variable, f"expected a URL like {expected}")
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in tail:
        raise ConfigError(variable, f"the URL has an '@' after its host part; {ENCODE_HINT}")
    if "#" in tail:
        raise ConfigError(variable, f"the URL has a '#'; {ENCODE_HINT}")
    path, _, query = tail.partition("?")
    userinfo, at, hostport = authority.rpartition("@")
    username = password = None
    if at:
        user_raw, colon, password_raw = userinfo.partition(":")
        username = unquote(user_raw)
        password = unquote(password_raw) if colon else None
    host, port = _split_host_port(variable, hostport)
    return UrlParts(scheme.lower(), username, password, host, port, path, query)


def _split_host_port(variable: str, hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        host, close, after = hostport[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise ConfigError(variable, "the host in the URL: put an IPv6 address in [brackets]")
        port_text: str | None = after[1:] if after else None
    else:
        host, colon, port_text = hostport.rpartition(":")
        if not colon:
            host, port_text = hostport, None
        elif ":" in host:
            raise ConfigError(variable, "the host in the URL: put an IPv6 address in [brackets]")
    if any(ch in "[]\\" for ch in host) or len(host) > 253:
        raise ConfigError(variable, "invalid characters in the host name of the URL")
    if not port_text:
        return host.lower(), None
    digits = port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
    if not digits or not 1 <= int(port_text) <= 65535:
        raise ConfigError(variable, "the port in the URL must be a number from 1 to 65535")
    return host.lower(), int(port_text)


def _wrong_scheme(variable: str, scheme: str, expected: str, why: str = "") -> ConfigError:
    named = f" {scheme}://" if scheme in KNOWN_SCHEMES else ""
    return ConfigError(variable, f"wrong scheme{named}: expected {expected}{why}")


def _credentials(variable: str, parts: UrlParts, expected: str) -> tuple[str, str]:
    if parts.username is None or parts.password is None:
        raise ConfigError(variable, f"the URL needs USER:PASSWORD@ ({expected})")
    if not parts.username:
        raise ConfigError(variable, "the user name in the URL is empty")
    return parts.username, parts.password


def _host(variable: str, parts: UrlParts) -> str:
    if not parts.host:
        raise ConfigError(variable, "the URL has no host")
    _check_hostname(variable, parts.host, show=False)
    if parts.host.endswith(".") and not parts.host.startswith("["):
        raise ConfigError(
            variable,
            "the URL's host name ends with a dot: write it without the dot (SNI carries no"
            " trailing dot, RFC 6066 section 3, and a Route's spec.host has none)",
        )
    return parts.host


def broker_from_env(environ: Mapping[str, str] | None = None) -> BrokerEndpoint:
    """Read `PACKIT_BROKER_*` into a `BrokerEndpoint`."""
    env = _environ(environ)
    variable = BROKER_PREFIX + "URL"
    raw = _get(env, variable)
    if raw is None:
        raise ConfigError(variable, "not set; expected amqps://USER:PASSWORD@ROUTE_HOST:443/VHOST")
    expected = "amqps://USER:PASSWORD@ROUTE_HOST:443/VHOST"
    parts = split_secret_url(variable, raw, expected)
    if parts.scheme not in ("amqps", "amqp"):
        raise _wrong_scheme(variable, parts.scheme, expected, " (or amqp:// to loopback)")
    if parts.query:
        raise ConfigError(
            variable,
            "no ?query options: TLS settings come from PACKIT_BROKER_CA_FILE/CERT_FILE/KEY_FILE"
            " (py-amqp breaks on ?ssl_* options)",
        )
    host = _host(variable, parts)
    username, password = _credentials(variable, parts, expected)
    tls = parts.scheme == "amqps"
    port = parts.port or (DEFAULT_AMQPS_PORT if tls else DEFAULT_AMQP_PORT)
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
    expected = "postgresql://USER:PASSWORD@HOST:PORT/DB"
    parts = split_secret_url(variable, raw, expected)
    if parts.scheme not in ("postgresql", "postgres"):
        raise _wrong_scheme(
            variable,
            parts.scheme,
            expected,
            " (only PostgreSQL 17+ can cross a passthrough Route, with direct TLS)",
        )
    if parts.query:
        raise ConfigError(variable, "no ?query options: TLS is always verify-full + direct")
    host = _host(variable, parts)
    username, password = _credentials(variable, parts, expected)
    dbname = unquote(parts.path[1:])
    if not dbname or "/" in dbname:
        raise ConfigError(variable, "the URL needs a database name: .../DBNAME")
    connect_raw = _get(env, prefix + "CONNECT_TO")
    return DatabaseEndpoint(
        host=host,
        port=parts.port or DEFAULT_POSTGRES_PORT,
        dbname=dbname,
        username=username,
        password=password,
        tls=_tls_settings(env, prefix, host),
        connect_to=parse_host_port(prefix + "CONNECT_TO", connect_raw) if connect_raw else None,
        variable_prefix=prefix,
    )


@dataclass(frozen=True)
class RedisEndpoint:
    """The Redis broker `migrate` drains: `redis://`, `rediss://` (TLS) or `unix://` (socket).

    Parsed here, by the one URL splitter, instead of by redis-py's `from_url` (which uses
    `urlsplit` and echoes part of a password with an unencoded `/`, `?` or `#`).
    """

    host: str
    port: int
    db: int
    username: str | None
    password: str | None = field(repr=False)
    tls: bool = False
    socket_path: str | None = None
    ssl_options: Mapping[str, str | bool] = field(default_factory=dict)

    @property
    def display_url(self) -> str:
        """The URL with the password masked, safe for logs and errors."""
        auth = f"{self.username or ''}:***@" if self.password is not None else ""
        if self.socket_path is not None:
            return f"unix://{auth}{self.socket_path}?db={self.db}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}"

    def client_kwargs(self) -> dict[str, Any]:
        """Keywords for `redis.Redis(...)` (the caller adds its timeouts)."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.socket_path is not None:
            kwargs["unix_socket_path"] = self.socket_path
        else:
            kwargs.update(host=self.host, port=self.port)
        if self.username:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.tls:
            kwargs["ssl"] = True
            kwargs.update(self.ssl_options)
        return kwargs


#: The `?query` options of a Redis URL that are understood; TLS ones for `rediss://` only.
REDIS_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
REDIS_CERT_REQS = ("none", "optional", "required")


def redis_from_url(raw: str, variable: str = MIGRATE_FROM_VARIABLE) -> RedisEndpoint:
    """Parse the source Redis URL (`--from` / `PACKIT_MIGRATE_FROM`) into a `RedisEndpoint`."""
    expected = "redis://[:PASSWORD@]HOST:PORT/DB (or rediss://, unix:///PATH?db=N)"
    text = raw.strip()
    if not text:
        raise ConfigError(variable, f"not set; expected {expected}")
    parts = split_secret_url(variable, text, expected)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise _wrong_scheme(variable, parts.scheme, expected)
    if parts.username is not None and parts.password is None:
        raise ConfigError(
            variable,
            "the URL has USER@ but no password: write redis://:PASSWORD@HOST (default user) or"
            " redis://USER:PASSWORD@HOST (ACL user)",
        )
    options = _redis_query(variable, parts)
    password = parts.password or None
    username = parts.username or None
    if parts.scheme == "unix":
        if parts.host or parts.port or not parts.path:
            raise ConfigError(variable, "a unix:// URL takes a socket path: unix:///PATH?db=N")
        db = _redis_db(variable, options.pop("db", "0"))
        _refuse_tls_options(variable, options, parts.scheme)
        socket_path = unquote(parts.path)
        return RedisEndpoint("", 0, db, username, password, socket_path=socket_path)
    host = _host(variable, parts)
    db_text = parts.path[1:] if len(parts.path) > 1 else "0"
    db = _redis_db(variable, options.pop("db", db_text))
    tls = parts.scheme == "rediss"
    if not tls:
        _refuse_tls_options(variable, options, parts.scheme)
    ssl_options: dict[str, str | bool] = dict(options)
    if tls and ssl_options.get("ssl_cert_reqs", "required") == "required":
        ssl_options["ssl_check_hostname"] = True
    port = parts.port or DEFAULT_REDIS_PORT
    return RedisEndpoint(host, port, db, username, password, tls, ssl_options=ssl_options)


def _redis_query(variable: str, parts: UrlParts) -> dict[str, str]:
    """The known options of the query; values are never echoed (one might be a secret)."""
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("db", *REDIS_TLS_OPTIONS) or name in options:
            raise ConfigError(
                variable,
                "unsupported or repeated ?option in the URL; understood, once each: db, "
                + ", ".join(REDIS_TLS_OPTIONS),
            )
        options[name] = value
    if options.get("ssl_cert_reqs", "required") not in REDIS_CERT_REQS:
        raise ConfigError(variable, "ssl_cert_reqs in the URL must be none, optional or required")
    return options


def _refuse_tls_options(variable: str, options: Mapping[str, str], scheme: str) -> None:
    if options:
        raise ConfigError(variable, f"?ssl_* options need rediss://, not {scheme}://")


def _redis_db(variable: str, text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise ConfigError(variable, "the database in the URL must be a number: .../0")
    return int(text)
