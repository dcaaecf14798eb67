"""The demo script: stack up, backlog, check, migrate, worker, results, summary, teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import click

from packit_broker.queues import DEFAULT_QUEUE_NAMES
from packit_broker.stack import Stack


@dataclass
class Timings:
    steps: dict[str, float] = field(default_factory=dict)

    def step(self, name: str, started: float) -> None:
        self.steps[name] = time.monotonic() - started


def _say(text: str) -> None:
    click.secho(f"==> {text}", bold=True, err=True)


def _env(stack: Stack) -> dict[str, str]:
    return {
        **os.environ,
        **stack.client_env(),
        "PACKIT_BROKER_QUEUES": ",".join(DEFAULT_QUEUE_NAMES),
    }


def _exports(stack: Stack) -> str:
    return "\n".join(f"export {k}='{v}'" for k, v in stack.client_env().items())


def _run_check(env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "packit_broker", "check"], env=env, check=False)
    if done.returncode not in (0,):
        raise click.ClickException("check failed on a fresh stack: see above")


def _wait_for_results(task_ids: list[str], env: dict[str, str], timeout: float) -> int:
    """Poll the result backend (PostgreSQL through the router) until every task succeeded."""
    import sqlalchemy

    from packit_broker import sqlalchemy_engine

    engine = sqlalchemy_engine(env, prefix="PACKIT_RESULT_BACKEND_")
    query = sqlalchemy.text(
        "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS' AND task_id = ANY(:ids)"
    )
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline:
        try:
            with engine.connect() as conn:
                done = int(conn.execute(query, {"ids": task_ids}).scalar() or 0)
        except sqlalchemy.exc.ProgrammingError:
            done = 0  # the worker has not created its table yet
        if done >= len(task_ids):
            break
        time.sleep(0.5)
    engine.dispose()
    return done


def run_demo(keep: bool) -> None:
    from packit_broker.demo.backlog import make_backlog

    timings = Timings()
    started = time.monotonic()
    _say(
        "starting the local stand-in of production (Redis, RabbitMQ TLS, PostgreSQL 17 TLS, router)"
    )
    stack = Stack()
    worker: subprocess.Popen[bytes] | None = None
    try:
        stack.start()
        timings.step("stack up", started)
        env = _env(stack)
        routes = f"{stack.rabbit_host}, {stack.postgres_host}"
        _say(f"router on 127.0.0.1:{stack.router_port} with passthrough Routes {routes}")

        t = time.monotonic()
        _say("filling Redis with a packit-like backlog (three queues, a killed worker, countdowns)")
        made = make_backlog(stack.redis_url(0), DEFAULT_QUEUE_NAMES)
        timings.step("backlog", t)

        _say("packit-broker check")
        try:
            import packit_broker.commands.check  # noqa: F401

            _run_check(env)
        except ImportError:
            click.echo("  (check command not available in this build)", err=True)

        t = time.monotonic()
        _say("packit-broker migrate --from redis://... (through the router, TLS+SNI)")
        report_file = stack.root / "migrate-report.json"
        migrate = subprocess.run(
            [
                sys.executable,
                "-m",
                "packit_broker",
                "migrate",
                "--from",
                stack.redis_url(0),
                "--report",
                str(report_file),
            ],
            env=env,
            check=False,
        )
        if migrate.returncode not in (0, 4):
            raise click.ClickException(f"migrate failed with exit code {migrate.returncode}")
        report = json.loads(report_file.read_text())
        timings.step("migrate", t)

        t = time.monotonic()
        _say("starting a Celery worker in the 'private cluster', configured by celery_config()")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "packit_broker.demo.tasks",
                "worker",
                "-P",
                "solo",
                "-Q",
                ",".join(DEFAULT_QUEUE_NAMES),
                "-l",
                "warning",
                "--without-gossip",
                "--without-mingle",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(stack.root / "worker.log").open("wb"),
        )
        ran = _wait_for_results(made.task_ids, env, timeout=120)
        timings.step("worker ran all tasks", t)

        from celery import Celery

        from packit_broker import celery_config

        reader = Celery("usage-api")  # like packit's usage API: reads results by task id
        reader.conf.update(celery_config(env))
        sample = str(reader.AsyncResult(made.countdown_ids[0]).get(timeout=30))
        _summary(made, report, ran, sample, timings, started)
        if ran < len(made.task_ids):
            raise click.ClickException(f"only {ran} of {len(made.task_ids)} tasks ran")
        if keep:
            click.echo("\nThe stack stays up; use it from another shell with:\n" + _exports(stack))
            click.echo("\nPress Ctrl-C to tear it down.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: tearing down", err=True)
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        stack.stop()
        _say(f"stack stopped, {stack.root} removed")


def _summary(
    made: object, report: dict[str, object], ran: int, sample: str, timings: Timings, started: float
) -> None:
    from packit_broker.demo.backlog import Backlog

    assert isinstance(made, Backlog)
    click.echo("\nSummary")
    click.echo(
        f"  tasks in the Redis backlog      {len(made.task_ids)} "
        f"(unacked from a killed worker: {made.unacked}, countdowns: {len(made.countdown_ids)})"
    )
    click.echo(f"  migrated per queue              {report['migrated']}")
    click.echo(
        f"  quarantined (kept in Redis)     {report['quarantined']}"
        " -> list packit_broker.quarantine"
    )
    click.echo(
        f"  tasks run by the worker         {ran} (results read back from PostgreSQL "
        "through the router)"
    )
    click.echo(f"  a countdown task's result       {sample!r}")
    for name, seconds in timings.steps.items():
        click.echo(f"  {name:<31} {seconds:6.1f}s")
    click.echo(f"  total                           {time.monotonic() - started:6.1f}s")
