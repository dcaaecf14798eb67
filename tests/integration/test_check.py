"""Issue: `packit-broker check`. Every diagnosis, provoked for real on the local rig."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from packit_broker.commands.check import check
from packit_broker.config import DEFAULT_HEARTBEAT, HostPort
from packit_broker.doctor import server_version_problem
from packit_broker.router import PassthroughRoute
from packit_broker.stack import Stack
from packit_broker.stack.certs import issue_extra
from packit_broker.stack.processes import free_port
from packit_broker.stack.router_process import temporary_router
from tests.integration.rabbitmqctl import memory_alarm

pytestmark = pytest.mark.integration


def run_check(env: dict[str, str], *args: str) -> tuple[int, list[dict[str, str]], str]:
    """Invoke the command with `--json`; return exit code, results and the raw output."""
    result = CliRunner().invoke(check, ["--json", "--timeout", "3", *args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output), result.output


def first_failure(results: list[dict[str, str]]) -> dict[str, str]:
    failures = [r for r in results if r["status"] == "FAIL"]
    assert failures, results
    return failures[0]


def broker_url(stack: Stack, host: str, *, port: int = 443, password: str | None = None) -> str:
    account = stack.broker_account
    return f"amqps://{account.username}:{password or account.password}@{host}:{port}/"


# -- healthy -------------------------------------------------------------------------------


def test_healthy_broker_and_database_through_the_router(
    stack: Stack, client_env: dict[str, str]
) -> None:
    code, results, output = run_check(client_env)
    assert code == 0, output
    by_layer = {(r["name"], r["layer"]): r for r in results}
    assert by_layer[("broker", "tls")]["seen"].startswith("TLSv1.3")
    assert "SNI rabbitmq.apps.packit.test" in by_layer[("broker", "tls")]["seen"]
    assert by_layer[("broker", "certificate")]["status"] == "ok"
    assert by_layer[("broker", "heartbeat")]["status"] == "ok"
    assert f"{DEFAULT_HEARTBEAT} s" in by_layer[("broker", "heartbeat")]["seen"]
    assert by_layer[("broker", "round-trip")]["status"] == "ok"
    assert " ms" in by_layer[("broker", "round-trip")]["seen"]
    assert by_layer[("database", "version")]["status"] == "ok"
    assert "PostgreSQL 17" in by_layer[("database", "version")]["seen"]
    assert by_layer[("database", "negotiation")]["status"] == "info"
    assert "would not be routed" in by_layer[("database", "negotiation")]["seen"]
    for secret in (stack.broker_account.password, stack.db_account.password):
        assert secret not in output


def test_table_output_is_readable_and_exit_zero(client_env: dict[str, str]) -> None:
    result = CliRunner().invoke(check, [], env=client_env)
    assert result.exit_code == 0, result.output
    assert "ENDPOINT" in result.output and "LAYER" in result.output
    assert "round-trip" in result.output and "healthy" in result.output


def test_server_version_comparison() -> None:
    problem = server_version_problem(160004)
    assert problem is not None and "PostgreSQL older than 17 cannot do direct TLS" in problem
    assert server_version_problem(170000) is None
    assert server_version_problem(180001) is None


# -- router: SNI and Routes ----------------------------------------------------------------


def test_no_sni_sent_ip_literal_url_host(stack: Stack) -> None:
    env = {**stack.broker_env(), "PACKIT_BROKER_URL": broker_url(stack, "127.0.0.1")}
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "router"
    assert "no SNI sent" in failure["seen"]
    assert "router answered with its default certificate" in failure["seen"]
    assert "Route host name in the URL" in failure["fix"]


def test_unknown_route_host_untrusted_router_certificate(stack: Stack) -> None:
    env = {**stack.broker_env(), "PACKIT_BROKER_URL": broker_url(stack, "unknown.apps.packit.test")}
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "router"
    assert "no Route for this host" in failure["seen"]
    assert "router answered with its default certificate" in failure["seen"]
    assert "unknown.apps.packit.test" in failure["fix"]


def test_unknown_route_host_trusted_router_certificate(stack: Stack, tmp_path: Path) -> None:
    """The handshake succeeds with the router's wildcard certificate; AMQP then dies."""
    bundle = tmp_path / "bundle.crt"
    bundle.write_text(stack.pki.ca_file.read_text() + stack.pki.router_ca_file.read_text())
    env = {
        **stack.broker_env(),
        "PACKIT_BROKER_URL": broker_url(stack, "unknown.apps.packit.test"),
        "PACKIT_BROKER_CA_FILE": str(bundle),
    }
    code, results, _ = run_check(env)
    assert code == 1
    certificate = next(r for r in results if r["layer"] == "certificate")
    assert certificate["status"] == "warn" and "matches only a wildcard" in certificate["seen"]
    failure = first_failure(results)
    assert failure["layer"] == "router"
    assert "no Route for this host" in failure["seen"]
    assert "router answered with its default certificate" in failure["seen"]
    assert "HTTP/1.1 503" in failure["seen"]


@pytest.fixture
def dead_backend_router(stack: Stack) -> Iterator[int]:
    """A second router whose Route for the broker host points at a port nobody listens on."""
    routes = (PassthroughRoute("dead", stack.rabbit_host, HostPort("127.0.0.1", free_port())),)
    with temporary_router(stack.pki.router_default_pem, routes) as port:
        yield port


def test_broker_down_behind_the_router(stack: Stack, dead_backend_router: int) -> None:
    env = {**stack.broker_env(), "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{dead_backend_router}"}
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "router", failure["seen"]
    assert "broker behind the Route is down" in failure["seen"]
    assert "targetPort" in failure["seen"]


def test_amqp_scheme_against_a_tls_port_says_use_amqps(stack: Stack) -> None:
    """Not "the broker behind the Route is down": the broker is up and speaks TLS."""
    account = stack.broker_account
    url = f"amqp://{account.username}:{account.password}@127.0.0.1:{stack.amqps_port}/"
    code, results, output = run_check({"PACKIT_BROKER_URL": url})
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "tls", failure
    assert "speaks TLS" in failure["seen"] and "amqp://" in failure["seen"]
    assert "use amqps://" in failure["fix"]
    assert "down" not in failure["seen"] + failure["fix"]
    assert account.password not in output


def test_memory_alarm_is_named_not_a_timeout(stack: Stack, queue_names: tuple[str, ...]) -> None:
    env = {**stack.broker_env(), "PACKIT_BROKER_QUEUES": ",".join(queue_names)}
    with memory_alarm(stack):
        code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "resource-alarm", failure
    assert "low on memory" in failure["seen"] and "memory alarm" in failure["seen"]
    assert "free memory" in failure["fix"]


def test_queue_with_other_arguments_shows_both(stack: Stack, queue_names: tuple[str, ...]) -> None:
    with stack.amqp_connection() as conn:
        conn.channel().queue_declare(
            queue_names[0], durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )
    env = {**stack.broker_env(), "PACKIT_BROKER_QUEUES": ",".join(queue_names)}
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "queue-arguments", failure
    assert "exists with arguments {'x-queue-type': 'quorum'}" in failure["seen"]
    assert "wants {}" in failure["seen"]
    assert "PACKIT_BROKER_QUEUE_TYPE" in failure["fix"]


# -- certificates --------------------------------------------------------------------------


def test_wrong_ca(stack: Stack, tmp_path: Path) -> None:
    other_ca, _ = issue_extra(tmp_path, "other", ("other.example.test",))
    env = {**stack.broker_env(), "PACKIT_BROKER_CA_FILE": str(other_ca)}
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "certificate"
    assert "does not lead to the configured CA" in failure["seen"]
    assert "packit-broker stack CA" in failure["seen"]  # who did sign it
    assert "CA_FILE" in failure["fix"]


def test_certificate_for_another_host(stack: Stack) -> None:
    env = {
        **stack.broker_env(),
        "PACKIT_BROKER_URL": broker_url(stack, "other.example.test", port=5671),
        "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{stack.amqps_port}",
    }
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "certificate"
    assert "not 'other.example.test'" in failure["seen"]
    assert "rabbitmq.apps.packit.test" in failure["seen"]
    assert "subjectAltName" in failure["fix"]


@pytest.fixture
def expired_tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A tiny TLS server on loopback presenting an expired certificate: (port, its CA)."""
    ca_file, cert = issue_extra(tmp_path, "expired", ("expired.example.test",), expired=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert.cert_file), str(cert.key_file))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.settimeout(2)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], ca_file
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_expired_certificate(stack: Stack, expired_tls_server: tuple[int, Path]) -> None:
    port, ca_file = expired_tls_server
    env = {
        "PACKIT_BROKER_URL": broker_url(stack, "expired.example.test", port=5671),
        "PACKIT_BROKER_CA_FILE": str(ca_file),
        "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{port}",
    }
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "certificate"
    assert "expired" in failure["seen"]
    assert "renew" in failure["fix"]


# -- TLS -----------------------------------------------------------------------------------


def test_plaintext_port_given_for_tls(stack: Stack) -> None:
    env = {**stack.broker_env(), "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{stack.redis_port}"}
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "tls"
    assert "that port speaks plaintext" in failure["seen"]
    assert "Redis" in failure["seen"]


def test_nothing_listening(stack: Stack) -> None:
    env = {**stack.broker_env(), "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{free_port()}"}
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "tcp" and "refused" in failure["seen"]


# -- AMQP ----------------------------------------------------------------------------------


def test_wrong_password(stack: Stack) -> None:
    wrong = "not-the-password-123"
    env = {
        **stack.broker_env(),
        "PACKIT_BROKER_URL": broker_url(stack, stack.rabbit_host, password=wrong),
    }
    code, results, output = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "amqp-login"
    assert "ACCESS_REFUSED" in failure["seen"]
    assert "wrong user name or password" in failure["fix"]
    assert wrong not in output
    table = CliRunner().invoke(check, ["--timeout", "3"], env=env)
    assert table.exit_code == 1 and wrong not in table.output and "FAIL" in table.output


def test_vhost_missing(stack: Stack) -> None:
    env = stack.broker_env(vhost="nope")
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "vhost"
    assert "vhost nope not found" in failure["seen"]
    assert "vhost is missing or the user has no access" in failure["fix"]


def test_no_permission_on_a_queue(stack: Stack) -> None:
    env = {**stack.broker_env(stack.limited_account), "PACKIT_BROKER_QUEUES": "notallowed"}
    code, results, _ = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["layer"] == "permission"
    assert "no permission on queue 'notallowed'" in failure["seen"]
    assert "ACCESS_REFUSED" in failure["seen"]


def test_limited_user_on_its_own_queues_is_healthy_with_warning(stack: Stack) -> None:
    env = {**stack.broker_env(stack.limited_account), "PACKIT_BROKER_QUEUES": "limited.check"}
    code, results, _ = run_check(env)
    assert code == 0
    trip: dict[str, Any] = next(r for r in results if r["layer"] == "round-trip")
    assert trip["status"] == "warn" and "server-named queue" in trip["seen"]


def test_heartbeat_zero_warns(stack: Stack, queue_names: tuple[str, ...]) -> None:
    env = {
        **stack.broker_env(),
        "PACKIT_BROKER_HEARTBEAT": "0",
        "PACKIT_BROKER_QUEUES": ",".join(queue_names),
    }
    code, results, _ = run_check(env)
    assert code == 0
    heartbeat = next(r for r in results if r["layer"] == "heartbeat")
    assert heartbeat["status"] == "warn" and "heartbeat 0" in heartbeat["seen"]


# -- configuration and PostgreSQL failures ---------------------------------------------------


def test_missing_broker_url_is_a_config_failure() -> None:
    code, results, _ = run_check({"PACKIT_BROKER_URL": ""})
    assert code == 1
    assert results[0]["layer"] == "config" and results[0]["endpoint"] == "PACKIT_BROKER_URL"


def test_database_wrong_password(stack: Stack, queue_names: tuple[str, ...]) -> None:
    env = {
        **stack.broker_env(),
        "PACKIT_BROKER_QUEUES": ",".join(queue_names),
        **stack.database_env("PACKIT_DATABASE_"),
    }
    env["PACKIT_DATABASE_URL"] = env["PACKIT_DATABASE_URL"].replace(
        stack.db_account.password, "wrong-db-password"
    )
    code, results, output = run_check(env)
    assert code == 1
    failure = first_failure(results)
    assert failure["name"] == "database" and failure["layer"] == "db-login"
    assert "password authentication failed" in failure["seen"]
    assert "wrong-db-password" not in output
