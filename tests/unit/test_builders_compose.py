"""The result-backend settings compose with what an app sets after `celery_config()`.

What each engine would send is read from SQLAlchemy's own `do_connect` event (a listener added
after ours sees the final keywords and stops there), so nothing here needs a server.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import create_engine, event

from packit_broker import celery_config, sqlalchemy_engine
from packit_broker.database import PLUGIN_ARGUMENT

SECRET = "Builder-Secret-9x"
ENV = {
    "PACKIT_BROKER_URL": "amqps://packit:pw@rabbitmq.apps.example.test:443/",
    "PACKIT_RESULT_BACKEND_URL": f"postgresql://packit:{SECRET}@pg.apps.example.test:443/results",
    "PACKIT_RESULT_BACKEND_CONNECT_TO": "10.0.0.7:9443",
}


class _Stop(Exception):
    """Raised by the capturing listener so that no connection is attempted."""


def _sent(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """The keywords the DBAPI would get for a connection of `create_engine(url, **options)`."""
    engine = create_engine(url, **options)
    seen: dict[str, Any] = {}

    def capture(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.update(cparams)
        raise _Stop

    event.listen(engine, "do_connect", capture)
    with pytest.raises(_Stop):
        engine.connect()
    return seen


def _engine_url(result_backend: str) -> str:
    return result_backend.removeprefix("db+")


def test_the_builders_url_gets_direct_tls_the_dialled_address_and_the_password() -> None:
    config = celery_config(ENV)
    sent = _sent(_engine_url(config["result_backend"]), config["database_engine_options"])
    assert sent["host"] == "pg.apps.example.test" and sent["hostaddr"] == "10.0.0.7"
    assert sent["port"] == "9443" and sent["password"] == SECRET
    assert sent["sslmode"] == "verify-full" and sent["sslnegotiation"] == "direct"


@pytest.mark.parametrize(
    "override",
    [
        "db+postgresql+psycopg2://other:their-pw@db.other.example:5432/other",
        "db+postgresql+psycopg2://packit@pg.apps.example.test:443/another_db",
        "db+postgresql+psycopg2://packit:their-pw@pg.apps.example.test:443/results",
    ],
)
def test_another_postgresql_url_gets_nothing_of_the_builders(override: str) -> None:
    """Today: the builder's host/hostaddr/port/password silently replace the app's."""
    config = celery_config(ENV)
    sent = _sent(_engine_url(override), config["database_engine_options"])
    assert SECRET not in sent.values()
    assert "hostaddr" not in sent and "sslnegotiation" not in sent
    expected = sqlalchemy.engine.make_url(_engine_url(override))
    assert sent["host"] == expected.host and sent.get("password") == expected.password


def test_sqlite_gets_nothing_of_the_builders() -> None:
    """Today: TypeError: Connection() takes at most 8 arguments (11 given)."""
    config = celery_config(ENV)
    engine = create_engine("sqlite://", **config["database_engine_options"])
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT 41 + 1")).scalar() == 42
    assert config["database_engine_options"][PLUGIN_ARGUMENT].url.startswith("postgresql")


def test_no_dns_lookup_while_building(monkeypatch: pytest.MonkeyPatch) -> None:
    """Today: getaddrinfo (no timeout) runs in celery_config() and pins the address."""
    lookups: list[str] = []

    def no_dns(host: str, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    env = {
        **ENV,
        "PACKIT_RESULT_BACKEND_CONNECT_TO": "router.unresolvable.invalid:443",
        "PACKIT_DATABASE_URL": ENV["PACKIT_RESULT_BACKEND_URL"],
        "PACKIT_DATABASE_CONNECT_TO": "router.unresolvable.invalid:443",
    }
    config = celery_config(env)
    engine = sqlalchemy_engine(env)
    assert lookups == []
    # The name is resolved when a connection is made, and a failure names the variable.
    with pytest.raises(sqlalchemy.exc.OperationalError, match="PACKIT_DATABASE_CONNECT_TO"):
        engine.connect()
    assert lookups == ["router.unresolvable.invalid"]
    url = _engine_url(config["result_backend"])
    backend = create_engine(url, **config["database_engine_options"])
    with pytest.raises(sqlalchemy.exc.OperationalError, match="RESULT_BACKEND_CONNECT_TO"):
        backend.connect()


def test_every_connection_resolves_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """No address pinned for the engine's lifetime: a moved router is followed."""
    addresses = iter(["192.0.2.1", "192.0.2.2"])

    def dns(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(addresses), port))]

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    config = celery_config({**ENV, "PACKIT_RESULT_BACKEND_CONNECT_TO": "router.example:443"})
    url, options = _engine_url(config["result_backend"]), config["database_engine_options"]
    assert _sent(url, options)["hostaddr"] == "192.0.2.1"
    assert _sent(url, options)["hostaddr"] == "192.0.2.2"


def test_the_settings_never_show_the_password() -> None:
    config = celery_config(ENV)
    assert SECRET not in repr(config) and SECRET not in str(config)
