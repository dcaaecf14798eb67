"""PostgreSQL through a passthrough Route: SQLAlchemy settings for direct TLS.

The connection arguments (Route host for SNI, the dialled address, the password, direct TLS)
are *bound to the URL the builder made*: a SQLAlchemy plugin in the engine options adds them
only to an engine created for exactly that URL. An app that sets another `result_backend`
after `celery_config()` (another server, another driver, sqlite) gets an engine for what it
set and nothing of ours: no password sent to the wrong server, no libpq keywords for sqlite.
The CONNECT_TO name is resolved when a connection is made, never while building settings.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from packit_broker.config import DATABASE_PREFIX, ConfigError, DatabaseEndpoint, database_from_env
from packit_broker.tls import libpq_parameters

#: The router closes a tunnel idle for `timeout tunnel` (1 h by default); recycle well before.
POOL_RECYCLE_SECONDS = 1800
#: The SQLAlchemy plugin (`create_engine(plugins=[...])`) and the engine option it consumes.
PLUGIN_NAME = "packit_broker_bound_connection"
PLUGIN_ARGUMENT = "packit_broker_connection"


def resolve_hostaddr(db: DatabaseEndpoint) -> str | None:
    """libpq's `hostaddr` must be numeric: resolve a CONNECT_TO name (call it at connect time)."""
    if db.connect_to is None:
        return None
    host = db.connect_to.host
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, db.connect_to.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(
            db.variable_prefix + "CONNECT_TO", f"cannot resolve {host!r} (DNS: {exc.strerror})"
        ) from None
    return str(infos[0][4][0])


def sqlalchemy_url(db: DatabaseEndpoint, driver: str = "postgresql+psycopg2") -> str:
    """A URL without the password (it travels in the bound connection, so it never gets printed)."""
    from sqlalchemy.engine import URL

    url = URL.create(driver, username=db.username, host=db.host, port=db.port, database=db.dbname)
    return url.render_as_string(hide_password=False)


def connect_args(db: DatabaseEndpoint) -> dict[str, str]:
    """libpq keywords for one connection now (resolves CONNECT_TO, so call it when connecting)."""
    args = libpq_parameters(db, resolve_hostaddr(db))
    args["password"] = db.password
    return args


@dataclass(frozen=True)
class BoundConnection:
    """The connection arguments of `db`, for an engine whose URL is exactly `url`."""

    url: str
    db: DatabaseEndpoint

    def matches(self, url: Any) -> bool:
        """Is `url` (a SQLAlchemy URL) the one the builder made? Anything else is the app's."""
        return bool(url.render_as_string(hide_password=False) == self.url)

    def on_connect(self, dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        """SQLAlchemy's `do_connect` event: add our keywords, resolving CONNECT_TO now."""
        try:
            cparams.update(connect_args(self.db))
        except ConfigError as exc:
            raise dialect.loaded_dbapi.OperationalError(str(exc)) from None


def _register_plugin() -> None:
    from sqlalchemy.dialects import plugins

    plugins.register(PLUGIN_NAME, "packit_broker.engine_plugin", "BindConnectionPlugin")


def engine_options(db: DatabaseEndpoint) -> dict[str, Any]:
    """`create_engine` keywords: direct TLS bound to our URL, pre-ping, recycle below the
    router's tunnel timeout. No DNS lookup here; the libpq version is checked here."""
    libpq_parameters(db)
    _register_plugin()
    return {
        "plugins": [PLUGIN_NAME],
        PLUGIN_ARGUMENT: BoundConnection(sqlalchemy_url(db), db),
        "pool_pre_ping": True,
        "pool_recycle": POOL_RECYCLE_SECONDS,
    }


def sqlalchemy_engine(
    environ: Mapping[str, str] | None = None, prefix: str = DATABASE_PREFIX, **kwargs: Any
) -> Any:
    """An engine for the app's own models, configured from `<prefix>*` variables."""
    from sqlalchemy import create_engine

    db = database_from_env(environ, prefix)
    if db is None:
        raise ConfigError(
            prefix + "URL", "not set; expected postgresql://USER:PASSWORD@HOST:PORT/DB"
        )
    options = engine_options(db)
    options.update(kwargs)
    return create_engine(sqlalchemy_url(db), **options)
