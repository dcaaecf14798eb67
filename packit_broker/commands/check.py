"""`packit-broker check`: a thin click layer over packit_broker.doctor."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Mapping

import click

from packit_broker.config import (
    DATABASE_PREFIX,
    RESULT_BACKEND_PREFIX,
    BrokerEndpoint,
    ConfigError,
    DatabaseEndpoint,
    broker_from_env,
    database_from_env,
    queues_from_env,
)
from packit_broker.doctor import (
    DEFAULT_TIMEOUT,
    CheckResult,
    check_broker,
    check_database,
    config_failure,
    healthy,
)
from packit_broker.doctor.deadline import Check, run_within
from packit_broker.queues import QueueSettings

EXIT_HEALTHY, EXIT_FAILED = 0, 1

FLAG_VARIABLES = {
    "broker_url": "PACKIT_BROKER_URL",
    "ca_file": "PACKIT_BROKER_CA_FILE",
    "connect_to": "PACKIT_BROKER_CONNECT_TO",
}

_STATUS_COLOURS = {"ok": "green", "warn": "yellow", "FAIL": "red", "info": "blue"}


def _environment(flags: Mapping[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for flag, variable in FLAG_VARIABLES.items():
        value = flags.get(flag)
        if value:
            env[variable] = value
    return env


def run_checks(env: Mapping[str, str], timeout: float = DEFAULT_TIMEOUT) -> list[CheckResult]:
    """Every configured endpoint, side by side, each within its deadline; a configuration
    error is a failed `config` line."""
    results: list[CheckResult] = []
    checks: list[tuple[str, str, str, Check]] = []
    try:
        broker = broker_from_env(env)
        queues = queues_from_env(env)
    except ConfigError as exc:
        results.append(config_failure("broker", exc))
    else:
        checks.append(
            ("broker", broker.display_url, "amqp",
             functools.partial(_broker, broker, queues, timeout))
        )  # fmt: skip
    seen_urls: set[str] = set()
    for name, prefix in (("database", DATABASE_PREFIX), ("result-backend", RESULT_BACKEND_PREFIX)):
        try:
            db = database_from_env(env, prefix)
        except ConfigError as exc:
            results.append(config_failure(name, exc))
            continue
        if db is None:
            continue
        if db.display_url in seen_urls:
            results.append(
                CheckResult(name, db.display_url, "config", "info", "same endpoint as above")
            )
            continue
        seen_urls.add(db.display_url)
        checks.append(
            (name, db.display_url, "postgresql", functools.partial(_database, db, name, timeout))
        )
    for found in run_within(checks, timeout):
        results += found
    return results


def _broker(
    broker: BrokerEndpoint, queues: QueueSettings, timeout: float, into: list[CheckResult]
) -> None:
    check_broker(broker, queues, timeout=timeout, results=into)


def _database(db: DatabaseEndpoint, name: str, timeout: float, into: list[CheckResult]) -> None:
    check_database(db, name, timeout=timeout, results=into)


def _render_table(results: list[CheckResult]) -> None:
    name_width = max([len("ENDPOINT"), *(len(r.name) for r in results)])
    layer_width = max([len("LAYER"), *(len(r.layer) for r in results)])
    header = f"{'ENDPOINT':<{name_width}}  {'LAYER':<{layer_width}}  STATUS  DETAIL"
    click.echo(header)
    indent = " " * (name_width + layer_width + 12)
    current = None
    for r in results:
        if r.endpoint != current:
            current = r.endpoint
            click.echo(f"# {r.name}: {r.endpoint}")
        status = click.style(f"{r.status:<6}", fg=_STATUS_COLOURS.get(r.status))
        click.echo(f"{r.name:<{name_width}}  {r.layer:<{layer_width}}  {status}  {r.seen}")
        if r.fix and r.status in ("FAIL", "warn"):
            click.echo(f"{indent}fix: {r.fix}")
    failed = [r for r in results if r.failed]
    warned = [r for r in results if r.status == "warn"]
    if failed:
        click.echo(f"\nFAILED: {len(failed)} check(s) failed, {len(warned)} warning(s).")
    else:
        click.echo(f"\nhealthy ({len(warned)} warning(s)).")


@click.command("check")
@click.option(
    "--broker-url", help="Overrides PACKIT_BROKER_URL (amqps://USER:PASS@HOST:443/VHOST)."
)
@click.option("--ca-file", help="Overrides PACKIT_BROKER_CA_FILE.")
@click.option("--connect-to", help="Overrides PACKIT_BROKER_CONNECT_TO (ADDRESS:PORT to dial).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.5),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds for each connect/handshake.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as a JSON list.")
def check(
    broker_url: str | None,
    ca_file: str | None,
    connect_to: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Check broker and database endpoints layer by layer (DNS, TCP, TLS, certificate, router,
    login, permissions) from PACKIT_BROKER_*, PACKIT_DATABASE_* and PACKIT_RESULT_BACKEND_*.

    Exit status 0 when healthy (warnings allowed), 1 when any check failed.
    """
    env = _environment({"broker_url": broker_url, "ca_file": ca_file, "connect_to": connect_to})
    results = run_checks(env, timeout)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        _render_table(results)
    sys.exit(EXIT_HEALTHY if healthy(results) else EXIT_FAILED)
