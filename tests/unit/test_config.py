"""Pure configuration parsing and building: no services."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from packit_broker import ConfigError, celery_config, pika_parameters, tls
from packit_broker.config import broker_from_env, database_from_env, queues_from_env
from packit_broker.database import (
    PLUGIN_ARGUMENT,
    PLUGIN_NAME,
    connect_args,
    engine_options,
    sqlalchemy_url,
)
from packit_broker.queues import QueueType

SECRET = "s3cr3t-P@ss:/word"
URL = "amqps://packit:s3cr3t-P%40ss%3A%2Fword@rabbitmq.apps.example.test:443/"


def env(**extra: str) -> dict[str, str]:
    return {"PACKIT_BROKER_URL": URL, **extra}


def test_celery_config_sends_sni_and_verifies() -> None:
    config = celery_config(env())
    assert config["broker_use_ssl"] == {
        "server_hostname": "rabbitmq.apps.example.test",
        "cert_reqs": ssl.CERT_REQUIRED,
        "tls_minimum_version": ssl.TLSVersion.TLSv1_2,
    }
    assert config["broker_url"].startswith("amqps://packit:s3cr3t-P%40ss%3A%2Fword@rabbitmq.apps")
    assert config["broker_heartbeat"] == 10  # packit_broker.recovery.HEARTBEAT
    assert config["broker_connection_max_retries"] is None
    assert config["broker_connection_retry_on_startup"] is True
    assert config["broker_transport_options"]["confirm_publish"] is True
    assert config["task_default_queue"] == "short-running"
    assert [q.name for q in config["task_queues"]] == [
        "short-running",
        "long-running",
        "rate-limited",
    ]
    assert "result_backend" not in config


def test_connect_to_changes_only_the_dialled_address() -> None:
    config = celery_config(env(PACKIT_BROKER_CONNECT_TO="127.0.0.1:8443"))
    assert "@127.0.0.1:8443/" in config["broker_url"]
    assert config["broker_use_ssl"]["server_hostname"] == "rabbitmq.apps.example.test"
    params = pika_parameters(env(PACKIT_BROKER_CONNECT_TO="[::1]:8443"))
    assert (params.host, params.port) == ("::1", 8443)
    assert params.ssl_options.server_hostname == "rabbitmq.apps.example.test"
    assert params.ssl_options.context.check_hostname is True
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
    assert params.ssl_options.context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_default_port_is_5671_and_vhost_decoded() -> None:
    broker = broker_from_env({"PACKIT_BROKER_URL": "amqps://u:p@h.example.test/my%2Fvhost"})
    assert broker.port == 5671 and broker.vhost == "my/vhost"


def test_queues_share_one_definition() -> None:
    queues = queues_from_env({"PACKIT_BROKER_QUEUES": "a,b", "PACKIT_BROKER_MAX_PRIORITY": "10"})
    config = celery_config(env(PACKIT_BROKER_QUEUES="a,b", PACKIT_BROKER_MAX_PRIORITY="10"))
    kombu_args = [q.queue_arguments for q in config["task_queues"]]
    assert kombu_args == [spec.arguments for spec in queues.specs]
    assert kombu_args == [{"x-max-priority": 10}] * 2
    quorum = queues_from_env({"PACKIT_BROKER_QUEUE_TYPE": "quorum"})
    assert quorum.queue_type is QueueType.QUORUM
    assert quorum.default.arguments["x-queue-type"] == "quorum"


@pytest.mark.parametrize(
    ("extra", "variable", "words"),
    [
        ({"PACKIT_BROKER_URL": ""}, "PACKIT_BROKER_URL", "not set"),
        ({"PACKIT_BROKER_URL": "redis://h:6379/0"}, "PACKIT_BROKER_URL", "scheme"),
        ({"PACKIT_BROKER_URL": "amqps://h.example.test/"}, "PACKIT_BROKER_URL", "USER:PASSWORD"),
        ({"PACKIT_BROKER_URL": "amqps://u:p@h:99999/"}, "PACKIT_BROKER_URL", "port"),
        ({"PACKIT_BROKER_URL": "amqps://u:p@h:44/?ssl_cert_reqs=0"}, "PACKIT_BROKER_URL", "query"),
        (
            {"PACKIT_BROKER_URL": "amqp://u:p@rabbit.example.test/"},
            "PACKIT_BROKER_URL",
            "plaintext",
        ),
        ({"PACKIT_BROKER_CONNECT_TO": "127.0.0.1"}, "PACKIT_BROKER_CONNECT_TO", "ADDRESS:PORT"),
        ({"PACKIT_BROKER_CONNECT_TO": "h:0"}, "PACKIT_BROKER_CONNECT_TO", "port"),
        ({"PACKIT_BROKER_CA_FILE": "/nonexistent/ca.pem"}, "PACKIT_BROKER_CA_FILE", "cannot read"),
        ({"PACKIT_BROKER_HEARTBEAT": "soon"}, "PACKIT_BROKER_HEARTBEAT", "whole number"),
        ({"PACKIT_BROKER_QUEUE_TYPE": "stream"}, "PACKIT_BROKER_QUEUE_TYPE", "classic"),
        ({"PACKIT_BROKER_QUEUES": "a,,b"}, "PACKIT_BROKER_QUEUES", "invalid queue name"),
        (
            {"PACKIT_BROKER_QUEUE_TYPE": "quorum", "PACKIT_BROKER_MAX_PRIORITY": "10"},
            "PACKIT_BROKER_MAX_PRIORITY",
            "quorum",
        ),
        (
            {"PACKIT_RESULT_BACKEND_URL": "redis://:p@h:6379/1"},
            "PACKIT_RESULT_BACKEND_URL",
            "PostgreSQL",
        ),
        (
            {"PACKIT_RESULT_BACKEND_URL": "postgresql://u:p@h:5432/"},
            "PACKIT_RESULT_BACKEND_URL",
            "database name",
        ),
    ],
)
def test_bad_values_name_the_variable(extra: dict[str, str], variable: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        celery_config(env(**extra))
    assert caught.value.variable == variable
    assert words.lower() in str(caught.value).lower()
    assert SECRET not in str(caught.value)


def test_plaintext_allowed_to_loopback_or_when_asked() -> None:
    assert broker_from_env({"PACKIT_BROKER_URL": "amqp://u:p@127.0.0.1/"}).tls is None
    allowed = {"PACKIT_BROKER_URL": "amqp://u:p@rabbit.lan/", "PACKIT_BROKER_ALLOW_PLAINTEXT": "1"}
    assert broker_from_env(allowed).port == 5672
    assert celery_config(allowed)["broker_use_ssl"] is False


def test_passwords_never_in_repr() -> None:
    broker = broker_from_env(env())
    assert SECRET not in repr(broker) and SECRET not in broker.display_url
    db = database_from_env(
        {"PACKIT_DATABASE_URL": "postgresql://u:hunter2@db.example.test:443/app"}
    )
    assert db is not None
    assert "hunter2" not in repr(db) and "hunter2" not in db.display_url
    assert "hunter2" not in sqlalchemy_url(db)


def test_result_backend_direct_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    config = celery_config(
        env(
            PACKIT_RESULT_BACKEND_URL="postgresql://u:pw@pg.apps.example.test:443/results",
            PACKIT_RESULT_BACKEND_CA_FILE=str(ca),
            PACKIT_RESULT_BACKEND_CONNECT_TO="127.0.0.1:9443",
        )
    )
    assert config["result_backend"] == "db+postgresql+psycopg2://u@pg.apps.example.test:443/results"
    bound = config["database_engine_options"][PLUGIN_ARGUMENT]
    assert config["database_engine_options"]["plugins"] == [PLUGIN_NAME]
    assert "pw" not in repr(config["database_engine_options"])
    args = connect_args(bound.db)
    assert args["sslnegotiation"] == "direct" and args["sslmode"] == "verify-full"
    assert args["host"] == "pg.apps.example.test" and args["hostaddr"] == "127.0.0.1"
    assert args["port"] == "9443" and args["sslrootcert"] == str(ca)
    assert config["database_engine_options"]["pool_pre_ping"] is True
    assert config["database_engine_options"]["pool_recycle"] < 3600


def test_old_libpq_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    db = database_from_env({"PACKIT_DATABASE_URL": "postgresql://u:p@db.example.test:443/app"})
    assert db is not None
    monkeypatch.setattr(tls, "libpq_version", lambda: 150008)
    with pytest.raises(ConfigError, match="libpq 17"):
        engine_options(db)


# -- hostile input ---------------------------------------------------------------------------

hostile = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)


@settings(max_examples=400, deadline=None)
@given(url=hostile, connect_to=hostile, heartbeat=hostile, queues=hostile, prio=hostile)
def test_parser_only_ever_raises_config_error(
    url: str, connect_to: str, heartbeat: str, queues: str, prio: str
) -> None:
    environ = {
        "PACKIT_BROKER_URL": url,
        "PACKIT_BROKER_CONNECT_TO": connect_to,
        "PACKIT_BROKER_HEARTBEAT": heartbeat,
        "PACKIT_BROKER_QUEUES": queues,
        "PACKIT_BROKER_MAX_PRIORITY": prio,
        "PACKIT_RESULT_BACKEND_URL": url.replace("amqp", "postgresql", 1),
    }
    try:
        config = celery_config(environ)
    except ConfigError:
        return
    assert config["broker_url"]


@settings(max_examples=300, deadline=None)
@given(
    password=st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=6, max_size=30
    ),
    port=st.text(alphabet=st.characters(exclude_characters="@/?#"), max_size=8),
)
def test_password_never_leaks_into_errors(password: str, port: str) -> None:
    from urllib.parse import quote

    assume(password not in port)  # the port text itself is echoed in its error

    url = f"amqps://user:{quote(password, safe='')}@host.example.test:{port}/"
    try:
        broker = broker_from_env({"PACKIT_BROKER_URL": url})
    except ConfigError as exc:
        # The message's own words ("PACKIT_BROKER_URL", ...) may contain a password by chance:
        # only what a harmless password would not also show counts as a leak.
        with pytest.raises(ConfigError) as reference:
            broker_from_env({"PACKIT_BROKER_URL": url.replace(quote(password, safe=""), "x")})
        encoded = quote(password, safe="")
        assert encoded not in str(exc) or encoded in str(reference.value)
        return
    assert broker.password == password
    # Static text of the repr ("heartbeat") may contain a short password by chance.
    reference = broker_from_env({"PACKIT_BROKER_URL": f"amqps://user:x@host.example.test:{port}/"})
    assert password not in repr(broker) or password in repr(reference)


@pytest.mark.parametrize("variable", ["PACKIT_BROKER_URL"])
def test_a_trailing_dot_host_is_refused_at_config_time(variable: str) -> None:
    with pytest.raises(ConfigError, match="ends with a dot"):
        broker_from_env({variable: "amqps://u:p@amqp.apps.example.com.:443/"})


def test_a_trailing_dot_database_host_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="ends with a dot"):
        database_from_env(
            {"PACKIT_DATABASE_URL": "postgresql://u:p@postgres.apps.example.com.:443/packit"},
            "PACKIT_DATABASE_",
        )
