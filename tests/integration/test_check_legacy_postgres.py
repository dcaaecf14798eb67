"""`packit-broker check` against a real PostgreSQL older than 17 (Debian 12's PostgreSQL 15).

Such a server does TLS only after the classic plaintext SSLRequest. A direct TLS ClientHello
(the only thing a passthrough Route can route) is read as a startup packet of absurd length and
the connection is closed without a word; libpq 17 then says "SSL SYSCALL error: EOF detected".
`check` must name the cause: no direct TLS, PostgreSQL older than 17, upgrade to 17+.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from click.testing import CliRunner

from packit_broker.commands.check import check
from packit_broker.config import HostPort
from packit_broker.router import PassthroughRoute
from packit_broker.stack import Stack, StackError
from packit_broker.stack.router_process import temporary_router
from tests.rig.legacy_postgres import LegacyPostgres, legacy_install
from tests.unavailable import unavailable

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg15(stack: Stack) -> Iterator[LegacyPostgres]:
    """PostgreSQL 15 with TLS (the stack's server certificate) on a free loopback port."""
    try:
        server = LegacyPostgres(stack.pki, stack.postgres_host).start()
    except StackError as exc:  # postgresql-15 not installed
        unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg15_router(stack: Stack, pg15: LegacyPostgres) -> Iterator[int]:
    """A router stand-in whose passthrough Route for the PostgreSQL host leads to PostgreSQL 15."""
    routes = (
        PassthroughRoute("postgres15", stack.postgres_host, HostPort("127.0.0.1", pg15.port)),
    )
    with temporary_router(stack.pki.router_default_pem, routes) as port:
        yield port


def database_env(stack: Stack, pg15: LegacyPostgres, dial_port: int) -> dict[str, str]:
    return {
        "PACKIT_DATABASE_URL": f"postgresql://{pg15.username}:{pg15.password}@"
        f"{stack.postgres_host}:443/postgres",
        "PACKIT_DATABASE_CA_FILE": str(stack.pki.ca_file),
        "PACKIT_DATABASE_CONNECT_TO": f"127.0.0.1:{dial_port}",
    }


def run_check(
    stack: Stack, queue_names: tuple[str, ...], database: dict[str, str]
) -> tuple[int, list[dict[str, str]], str]:
    env = {
        **stack.broker_env(),
        "PACKIT_BROKER_QUEUES": ",".join(queue_names),
        "PACKIT_RESULT_BACKEND_URL": "",
        **database,
    }
    result = CliRunner().invoke(check, ["--json", "--timeout", "3"], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output), result.output


def database_failure(results: list[dict[str, str]]) -> dict[str, str]:
    failures = [r for r in results if r["status"] == "FAIL"]
    assert [r["name"] for r in failures] == ["database"], failures
    return failures[0]


def assert_no_direct_tls_diagnosis(failure: dict[str, str]) -> None:
    assert failure["layer"] == "postgresql", failure
    assert "does not speak direct TLS" in failure["seen"], failure
    assert "older than 17" in failure["seen"], failure
    assert "upgrade the server to PostgreSQL 17+" in failure["fix"], failure


def test_the_server_is_really_postgresql_15_and_refuses_direct_tls(pg15: LegacyPostgres) -> None:
    """What the diagnosis stands on: classic TLS works, libpq 17's direct TLS gets EOF."""
    assert 150000 <= pg15.server_version_num() < 160000
    with pytest.raises(psycopg2.OperationalError, match="EOF detected"):
        psycopg2.connect(**pg15.direct_params()).close()


def test_check_direct_to_postgresql_15(
    stack: Stack, pg15: LegacyPostgres, queue_names: tuple[str, ...]
) -> None:
    code, results, output = run_check(stack, queue_names, database_env(stack, pg15, pg15.port))
    assert code == 1
    failure = database_failure(results)
    assert_no_direct_tls_diagnosis(failure)
    assert "answers PostgreSQL's classic SSLRequest with 'S'" in failure["seen"]
    by_layer = {r["layer"]: r["status"] for r in results if r["name"] == "database"}
    assert by_layer["tcp"] == "ok"
    assert pg15.password not in output
    table = CliRunner().invoke(
        check,
        ["--timeout", "3"],
        env={
            **stack.broker_env(),
            "PACKIT_BROKER_QUEUES": ",".join(queue_names),
            **database_env(stack, pg15, pg15.port),
        },
    )
    assert table.exit_code == 1
    assert "does not speak direct TLS" in table.output and pg15.password not in table.output


def test_check_through_a_router_to_postgresql_15(
    stack: Stack, pg15: LegacyPostgres, pg15_router: int, queue_names: tuple[str, ...]
) -> None:
    code, results, output = run_check(stack, queue_names, database_env(stack, pg15, pg15_router))
    assert code == 1
    failure = database_failure(results)
    assert_no_direct_tls_diagnosis(failure)
    assert "behind the Route" in failure["seen"]
    assert pg15.password not in output


def test_missing_binaries_name_the_debian_package_and_the_script(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"apt-get install postgresql-15") as caught:
        legacy_install(unpacked=tmp_path, system_root=tmp_path)
    assert "tests/rig/legacy-postgres.sh" in str(caught.value)
