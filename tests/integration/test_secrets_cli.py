"""No fragment of a password in what `migrate` and `check` print, against the real rig.

Hypothesis feeds passwords of every printable character, unencoded, into the Redis, AMQP and
PostgreSQL URLs; each command runs for real (click's CliRunner in-process, and once as a
subprocess), parses them and, when they parse, logs in with them and is refused. Its stdout and
stderr (and any traceback) are scanned for every fragment of 3+ characters of the password.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings

from packit_broker.cli import cli
from packit_broker.stack import Stack
from tests.secrets_scan import leaked, login_passwords, surrogate

pytestmark = pytest.mark.integration

#: Refused before anything happens (2), or a failed login / failed check (1).
EXPECTED_EXITS = (1, 2)
NASTY = ("Zq9/x#Yw?v@Kp:Lm%Nr", "Zq9:x@Yw%zzKp[]Lm", "Zq9 x\tYw")
EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _clean_env(extra: Mapping[str, str]) -> dict[str, str | None]:
    """Only the PACKIT_* variables given, whatever the test runner's environment holds."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PACKIT_")}
    return {**unset, **extra}


def _invoke(args: list[str], env: Mapping[str, str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, args, env=_clean_env(env), catch_exceptions=True)
    output = result.stdout + result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert result.exc_info is not None
        output += "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(f"unexpected exception:\n{output}")
    return result.exit_code, output


def _assert_silent(password: str, run: Callable[[str], tuple[int, str]]) -> None:
    code, output = run(password)
    reference_code, reference = run(surrogate(password))
    assert code in EXPECTED_EXITS, output
    assert code == reference_code, (output, reference)
    assert leaked(password, output, reference) == [], output


def _broker_url(stack: Stack, password: str) -> str:
    return f"amqps://packit:{password}@{stack.rabbit_host}:443/"


def _database_url(stack: Stack, password: str) -> str:
    return f"postgresql://packit:{password}@{stack.postgres_host}:443/packit"


@EXAMPLES
@given(password=login_passwords())
@example(password=NASTY[0])
@example(password=NASTY[1])
def test_migrate_prints_no_fragment_of_the_redis_password(
    stack: Stack, client_env: dict[str, str], password: str
) -> None:
    def run(secret: str) -> tuple[int, str]:
        source = f"redis://:{secret}@127.0.0.1:{stack.redis_port}/0"
        return _invoke(["migrate", "--dry-run", "--from", source], client_env)

    _assert_silent(password, run)


@EXAMPLES
@given(password=login_passwords())
@example(password=NASTY[0])
@example(password=NASTY[1])
def test_migrate_prints_no_fragment_of_the_broker_password(
    stack: Stack, client_env: dict[str, str], redis_url: str, password: str
) -> None:
    def run(secret: str) -> tuple[int, str]:
        env = {**client_env, "PACKIT_BROKER_URL": _broker_url(stack, secret)}
        return _invoke(["migrate", "--from", redis_url], env)

    _assert_silent(password, run)


@EXAMPLES
@given(password=login_passwords())
@example(password=NASTY[0])
@example(password=NASTY[1])
def test_check_prints_no_fragment_of_any_password(
    stack: Stack, client_env: dict[str, str], password: str
) -> None:
    def run(secret: str) -> tuple[int, str]:
        env = {
            **client_env,
            "PACKIT_BROKER_URL": _broker_url(stack, secret),
            "PACKIT_DATABASE_URL": _database_url(stack, secret),
            "PACKIT_RESULT_BACKEND_URL": _database_url(stack, secret + "x"),
        }
        return _invoke(["check", "--timeout", "5"], env)

    _assert_silent(password, run)


def _subprocess(args: list[str], env: Mapping[str, str]) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PACKIT_")}
    done = subprocess.run(
        [sys.executable, "-m", "packit_broker", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("password", NASTY)
def test_the_real_processes_print_no_fragment(
    stack: Stack, client_env: dict[str, str], redis_url: str, password: str
) -> None:
    """The installed entry point, as an operator runs it: migrate (both URLs) and check."""

    def migrate_from(secret: str) -> tuple[int, str]:
        source = f"redis://:{secret}@127.0.0.1:{stack.redis_port}/0"
        return _subprocess(["migrate", "--from", source], client_env)

    def migrate_to(secret: str) -> tuple[int, str]:
        env = {**client_env, "PACKIT_BROKER_URL": _broker_url(stack, secret)}
        return _subprocess(["migrate", "--from", redis_url], env)

    def check(secret: str) -> tuple[int, str]:
        env = {
            **client_env,
            "PACKIT_BROKER_URL": _broker_url(stack, secret),
            "PACKIT_DATABASE_URL": _database_url(stack, secret),
        }
        return _subprocess(["check", "--timeout", "5"], env)

    for run in (migrate_from, migrate_to, check):
        _assert_silent(password, run)


def test_migrate_takes_the_source_from_the_environment(
    client_env: dict[str, str], redis_url: str
) -> None:
    """PACKIT_MIGRATE_FROM: the Redis password need not be in argv (ps, shell history)."""
    code, output = _invoke(
        ["migrate", "--dry-run"], {**client_env, "PACKIT_MIGRATE_FROM": redis_url}
    )
    assert code == 0, output
    assert "Plan (nothing has been changed)" in output
