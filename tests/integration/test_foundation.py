"""Issue: foundation. Real Celery, pika and SQLAlchemy clients through the router stand-in."""

from __future__ import annotations

import ssl
from pathlib import Path

import amqp
import kombu
import pika
import pytest
import sqlalchemy
from celery import Celery

from packit_broker import celery_config, pika_parameters, sqlalchemy_engine
from packit_broker.stack import Stack
from packit_broker.stack.certs import issue_extra
from tests.integration.workers import celery_worker

pytestmark = pytest.mark.integration


def test_celery_worker_through_router_with_postgres_results(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tasks go through the router to RabbitMQ (TLS+SNI); results come back from PostgreSQL."""
    for key, value in client_env.items():
        monkeypatch.setenv(key, value)
    producer = Celery("producer")
    producer.conf.update(celery_config(client_env))
    with celery_worker(client_env, list(queue_names), tmp_path / "worker.log"):
        results = [
            producer.send_task("taskapp.add", (i, 1000), queue=queue_names[i % 3]) for i in range(6)
        ]
        values = [r.get(timeout=60) for r in results]
    assert values == [i + 1000 for i in range(6)]
    # The results really live in PostgreSQL, read back through the router with direct TLS.
    engine = sqlalchemy_engine(client_env)
    with engine.connect() as conn:
        stored = conn.execute(
            sqlalchemy.text("SELECT count(*) FROM celery_taskmeta WHERE task_id = ANY(:ids)"),
            {"ids": [r.id for r in results]},
        ).scalar()
    assert stored == 6


def test_pika_publishes_and_consumes_through_router(
    client_env: dict[str, str], queue_names: tuple[str, ...]
) -> None:
    connection = pika.BlockingConnection(pika_parameters(client_env))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue_names[0], exclusive=True)
        channel.basic_publish("", queue_names[0], b"hello through the router")
        method, _props, body = channel.basic_get(queue_names[0], auto_ack=True)
        assert method is not None and body == b"hello through the router"
        assert isinstance(connection._impl.params.ssl_options.context, ssl.SSLContext)
    finally:
        connection.close()


def test_sqlalchemy_engine_uses_direct_tls_through_router(client_env: dict[str, str]) -> None:
    engine = sqlalchemy_engine(client_env)
    with engine.connect() as conn:
        version = conn.execute(sqlalchemy.text("SHOW server_version_num")).scalar()
        ssl_on = conn.execute(
            sqlalchemy.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        ).scalar()
    assert int(str(version)) >= 170000
    assert ssl_on is True


def _kombu_connect(config: dict[str, object]) -> None:
    conn = kombu.Connection(config["broker_url"], ssl=config["broker_use_ssl"], connect_timeout=5)
    try:
        conn.connect()
    finally:
        conn.release()


def test_stock_amqps_without_sni_is_sent_to_router_default(stack: Stack) -> None:
    """The pitfall: `ssl=True` sends no SNI, so the router cannot route it."""
    env = stack.broker_env()
    url = (
        f"amqps://{stack.broker_account.username}:{stack.broker_account.password}"
        f"@127.0.0.1:{stack.router_port}//"
    )
    with pytest.raises(Exception):  # noqa: B017 - py-amqp's errors vary; any failure will do
        _kombu_connect({"broker_url": url, "broker_use_ssl": True})
    # ... while the same router, same credentials, configured by celery_config() gets in.
    _kombu_connect(celery_config(env))


def test_host_name_is_checked(stack: Stack) -> None:
    """A certificate from the trusted CA but for another name is refused (stock: accepted)."""
    env = stack.broker_env(via_router=False)
    env["PACKIT_BROKER_URL"] = env["PACKIT_BROKER_URL"].replace(
        stack.rabbit_host, "other-host.example.test"
    )
    with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)hostname"):
        _kombu_connect(celery_config(env))


def test_wrong_ca_is_refused(stack: Stack, tmp_path: Path) -> None:
    other_ca, _ = issue_extra(tmp_path, "other", ("x.example.test",))
    env = {**stack.broker_env(), "PACKIT_BROKER_CA_FILE": str(other_ca)}
    with pytest.raises(ssl.SSLCertVerificationError):
        _kombu_connect(celery_config(env))
    with pytest.raises(ssl.SSLCertVerificationError):
        pika.BlockingConnection(pika_parameters(env, connection_attempts=1))


def test_localhost_url_is_still_verified(stack: Stack, tmp_path: Path) -> None:
    """kombu rewrites localhost to 127.0.0.1 and drops SNI; ours keeps the name and checks it."""
    account = stack.broker_account
    env = {
        "PACKIT_BROKER_URL": f"amqps://{account.username}:{account.password}"
        f"@localhost:{stack.amqps_port}/",
        "PACKIT_BROKER_CA_FILE": str(stack.pki.ca_file),
    }
    config = celery_config(env)
    assert config["broker_use_ssl"]["server_hostname"] == "localhost"
    _kombu_connect(config)  # the server certificate carries localhost: accepted
    other_ca, _ = issue_extra(tmp_path, "other", ("localhost",))
    with pytest.raises(ssl.SSLCertVerificationError):
        _kombu_connect(celery_config({**env, "PACKIT_BROKER_CA_FILE": str(other_ca)}))


def test_sni_is_sent_and_verified_by_py_amqp_directly(stack: Stack) -> None:
    """py-amqp itself (what Celery uses), given our ssl dict, passes the SNI-routing router."""
    config = celery_config(stack.broker_env())
    connection = amqp.Connection(
        f"127.0.0.1:{stack.router_port}",
        userid=stack.broker_account.username,
        password=stack.broker_account.password,
        ssl=config["broker_use_ssl"],
        connect_timeout=5,
    )
    connection.connect()
    try:
        sock = connection.transport.sock
        assert sock.server_hostname == stack.rabbit_host
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        connection.close()
