"""The demo script: stack up, backlog, check, migrate, worker, results, summary, teardown.

Every step runs the real thing: the `packit-broker` commands as subprocesses, a `celery worker`
configured only by `celery_config()`, results read back through the PostgreSQL Route.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from packit_broker.config import MIGRATE_FROM_VARIABLE
from packit_broker.demo.backlog import Backlog, make_backlog
from packit_broker.queues import DEFAULT_QUEUE_NAMES
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process

RESULTS_TIMEOUT = 120.0


@dataclass
class Timings:
    started: float = field(default_factory=time.monotonic)
    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str, headline: str) -> Iterator[None]:
        click.secho(f"==> {headline}", bold=True, err=True)
        begin = time.monotonic()
        yield
        self.steps[name] = time.monotonic() - begin


def _env(stack: Stack) -> dict[str, str]:
    queues = ",".join(DEFAULT_QUEUE_NAMES)
    return {**os.environ, **stack.client_env(), "PACKIT_BROKER_QUEUES": queues}


def _packit_broker(env: dict[str, str], *args: str) -> int:
    """Run a `packit-broker` command exactly as a user would; its output goes to the terminal."""
    argv = [sys.executable, "-m", "packit_broker", *args]
    return subprocess.run(argv, env=env, check=False).returncode


def _migrate(stack: Stack, env: dict[str, str]) -> dict[str, Any]:
    """The source URL goes in PACKIT_MIGRATE_FROM: a password in argv is visible in `ps`."""
    report_file = stack.root / "migrate-report.json"
    migrate_env = {**env, MIGRATE_FROM_VARIABLE: stack.redis_url(0)}
    code = _packit_broker(migrate_env, "migrate", "--report", str(report_file))
    if code not in (0, 4):  # 4: done, with the malformed message quarantined
        raise click.ClickException(f"migrate failed with exit code {code}")
    report: dict[str, Any] = json.loads(report_file.read_text())
    return report


@contextlib.contextmanager
def _worker(stack: Stack, env: dict[str, str]) -> Iterator[None]:
    """A Celery worker in the "private cluster": configured by celery_config(), nothing else."""
    argv = [sys.executable, "-m", "celery", "-A", "packit_broker.demo.tasks", "worker", "-P",
            "solo", "-Q", ",".join(DEFAULT_QUEUE_NAMES), "-l", "warning", "--without-gossip",
            "--without-mingle"]  # fmt: skip
    worker = Process("celery-worker", argv, stack.root / "worker.log", env=env)
    worker.start()
    try:
        yield
    finally:
        worker.stop()


def _wait_for_results(task_ids: list[str], env: dict[str, str]) -> int:
    """Poll the result backend (PostgreSQL through the router) until every task succeeded."""
    import sqlalchemy

    from packit_broker import sqlalchemy_engine

    engine = sqlalchemy_engine(env, prefix="PACKIT_RESULT_BACKEND_")
    query = sqlalchemy.text(
        "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS' AND task_id = ANY(:ids)"
    )
    deadline = time.monotonic() + RESULTS_TIMEOUT
    done = 0
    try:
        while time.monotonic() < deadline and done < len(task_ids):
            try:
                with engine.connect() as conn:
                    done = int(conn.execute(query, {"ids": task_ids}).scalar() or 0)
            except sqlalchemy.exc.ProgrammingError:
                done = 0  # the worker has not created its table yet
            time.sleep(0.5)
    finally:
        engine.dispose()
    return done


def _read_result(env: dict[str, str], task_id: str) -> str:
    """As packit's usage API does: a Celery app that only reads results, by task id."""
    from celery import Celery

    from packit_broker import celery_config

    reader = Celery("usage-api")
    reader.conf.update(celery_config(env))
    return str(reader.AsyncResult(task_id).get(timeout=30))


def run_demo(keep: bool) -> None:
    timings = Timings()
    stack = Stack()
    try:
        with timings.step("stack up", "starting Redis, RabbitMQ (TLS), PostgreSQL 17, router"):
            stack.start()
        env = _env(stack)
        click.echo(f"    router 127.0.0.1:{stack.router_port}: passthrough Routes"
                   f" {stack.rabbit_host}, {stack.postgres_host}", err=True)  # fmt: skip
        with timings.step("backlog", "a packit-like Redis backlog (3 queues, killed worker)"):
            made = make_backlog(stack.redis_url(0), DEFAULT_QUEUE_NAMES)
        with timings.step("check", "packit-broker check"):
            if _packit_broker(env, "check") != 0:
                raise click.ClickException("check failed on a fresh stack: see above")
        with timings.step("migrate", "packit-broker migrate (through the router, TLS+SNI)"):
            report = _migrate(stack, env)
        with (
            timings.step("worker ran all tasks", "a Celery worker configured by celery_config()"),
            _worker(stack, env),
        ):
            ran = _wait_for_results(made.task_ids, env)
            sample = _read_result(env, made.countdown_ids[0])
        _summary(made, report, ran, sample, timings)
        if ran < len(made.task_ids):
            raise click.ClickException(f"only {ran} of {len(made.task_ids)} tasks ran")
        if keep:
            env_file = _write_client_env(stack)
            click.echo(
                "\nThe stack stays up; use it from another shell with:\n"
                f"{_activate_line()}"
                f"  set -a; . {shlex.quote(str(env_file))}; set +a\n"
                "  packit-broker check        # RabbitMQ and PostgreSQL through the router\n"
                '  redis-cli -u "$PACKIT_MIGRATE_FROM" --no-auth-warning keys "*"   # Redis'
            )
            click.echo("\nPress Ctrl-C to tear it down.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: tearing down", err=True)
    finally:
        stack.stop()
        click.secho(f"==> stack stopped, {stack.root} removed", bold=True, err=True)


def _activate_line() -> str:
    """How another shell gets `packit-broker`: ./dev installs it into .venv, not on PATH."""
    if sys.prefix != sys.base_prefix:  # a virtual environment, as ./dev makes
        activate = Path(sys.prefix) / "bin" / "activate"
        return f"  . {shlex.quote(str(activate))}   # puts packit-broker on PATH\n"
    found = shutil.which("packit-broker")
    if found:
        return f"  # packit-broker is {found}\n"
    return f"  # packit-broker is not on PATH: run {shlex.quote(sys.executable)} -m packit_broker\n"


def _write_client_env(stack: Stack) -> Path:
    """The exports for another shell, in a file only this user can read (they hold passwords)."""
    env_file = stack.root / "client.env"
    env_file.touch(mode=0o600)
    env_file.chmod(0o600)
    lines = [f"{k}={shlex.quote(v)}" for k, v in stack.client_env().items()]
    lines.append(f"{MIGRATE_FROM_VARIABLE}={shlex.quote(stack.redis_url(0))}")
    env_file.write_text("\n".join(lines) + "\n")
    return env_file


def _summary(
    made: Backlog, report: dict[str, Any], ran: int, sample: str, timings: Timings
) -> None:
    backlog = (
        f"{len(made.task_ids)} (unacked from a killed worker: {made.unacked},"
        f" countdowns: {len(made.countdown_ids)})"
    )
    rows = [
        ("tasks in the Redis backlog", backlog),
        ("migrated per queue", str(report["migrated"])),
        ("quarantined (kept in Redis)", f"{report['quarantined']} -> packit_broker.quarantine"),
        ("tasks run by the worker", f"{ran} (results read from PostgreSQL through the router)"),
        ("a countdown task's result", repr(sample)),
        *((name, f"{seconds:6.1f}s") for name, seconds in timings.steps.items()),
        ("total", f"{time.monotonic() - timings.started:6.1f}s"),
    ]
    click.echo("\nSummary")
    for label, value in rows:
        click.echo(f"  {label:<31} {value}")
