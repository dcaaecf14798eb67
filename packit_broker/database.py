"""PostgreSQL through a passthrough Route: SQLAlchemy settings for direct TLS."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from typing import Any

from packit_broker.config import DATABASE_PREFIX, ConfigError, DatabaseEndpoint, database_from_env
from packit_broker.tls import libpq_parameters

#: The router closes a tunnel idle for `timeout tunnel` (1 h by default); recycle well before.
POOL_RECYCLE_SECONDS = 1800


def resolve_hostaddr(db: DatabaseEndpoint) -> str | None:
    """libpq's `hostaddr` must be numeric: resolve a CONNECT_TO name once, here."""
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
    """A URL without the password (it travels in `connect_args`, so it never gets printed)."""
    from sqlalchemy.engine import URL

    url = URL.create(driver, username=db.username, host=db.host, port=db.port, database=db.dbname)
    return url.render_as_string(hide_password=False)


def connect_args(db: DatabaseEndpoint) -> dict[str, str]:
    args = libpq_parameters(db, resolve_hostaddr(db))
    args["password"] = db.password
    return args


def engine_options(db: DatabaseEndpoint) -> dict[str, Any]:
    """`create_engine` keywords: direct TLS, pre-ping, recycle below the router's tunnel timeout."""
    return {
        "connect_args": connect_args(db),
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
