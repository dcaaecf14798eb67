"""`packit-broker migrate`: a thin click layer over packit_broker.migrate."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import amqp
import click
import redis

from packit_broker.config import ConfigError, broker_from_env, queues_from_env
from packit_broker.errors import RABBITMQ, REDIS, Diagnosed, classify
from packit_broker.migrate import MigrateOptions, Migration, Plan, Refused, make_plan
from packit_broker.migrate.redis_source import Keys, RedisSource
from packit_broker.migrate.run import DEFAULT_MAX_MESSAGE_SIZE

#: What a network, TLS, broker or Redis failure can raise; anything else is a bug and shows
#: its traceback.
CONNECTION_ERRORS = (OSError, EOFError, amqp.exceptions.AMQPError, redis.RedisError, Diagnosed)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_QUARANTINED = 0, 1, 2, 3, 4

FLAG_VARIABLES = {
    "to": "PACKIT_BROKER_URL",
    "ca_file": "PACKIT_BROKER_CA_FILE",
    "cert_file": "PACKIT_BROKER_CERT_FILE",
    "key_file": "PACKIT_BROKER_KEY_FILE",
    "connect_to": "PACKIT_BROKER_CONNECT_TO",
}


def _environment(flags: dict[str, Any]) -> dict[str, str]:
    """The environment with flags layered on top: one parser for both."""
    env = dict(os.environ)
    for flag, variable in FLAG_VARIABLES.items():
        if flags.get(flag):
            env[variable] = str(flags[flag])
    return env


def _print_plan(plan: Plan) -> None:
    click.echo("Plan (nothing has been changed):")
    for q in plan.queues:
        buckets = ", ".join(f"p{step}={n}" for step, n in q.counts.items() if n) or "empty"
        click.echo(
            f"  {q.spec.name:<28} {q.total:>8} messages ({buckets}); unacked {q.unacked};"
            f" {q.origin}; declare durable {q.spec.arguments or '{}'}"
        )
    click.echo(f"  unacked entries to move first: {plan.unacked_total}")
    if plan.refusal:
        click.echo(f"  would refuse without --force: {plan.refusal}")


class _Progress:
    def __init__(self, total: int, as_json: bool) -> None:
        self.as_json = as_json
        self.done = 0
        self.total = total
        self.bar = None
        if not as_json and sys.stderr.isatty():
            self.bar = click.progressbar(length=total, label="migrating", file=sys.stderr)
            self.bar.__enter__()

    def __call__(self, queue: str, count: int) -> None:
        self.done += count
        if self.as_json:
            event = {"event": "progress", "queue": queue, "moved": self.done, "total": self.total}
            click.echo(json.dumps(event))
        elif self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.command()
@click.option(
    "--from",
    "source_url",
    required=True,
    metavar="redis://[:PASSWORD@]HOST:PORT/DB",
    help="The Redis broker to drain.",
)
@click.option(
    "--to",
    metavar="amqps://USER:PASSWORD@HOST:PORT/VHOST",
    help="Destination broker (default: PACKIT_BROKER_URL).",
)
@click.option("--ca-file", type=click.Path(dir_okay=False), help="PACKIT_BROKER_CA_FILE")
@click.option("--cert-file", type=click.Path(dir_okay=False), help="PACKIT_BROKER_CERT_FILE")
@click.option("--key-file", type=click.Path(dir_okay=False), help="PACKIT_BROKER_KEY_FILE")
@click.option("--connect-to", metavar="ADDRESS:PORT", help="PACKIT_BROKER_CONNECT_TO")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    help="Only this queue (repeatable). Default: configured + found in Redis.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing anywhere.")
@click.option(
    "--report",
    "report_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the JSON report here.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10000),
    default=1000,
    show_default=True,
    help="Messages per batch = the publisher-confirm window.",
)
@click.option("--include-unacked/--no-include-unacked", default=True, show_default=True)
@click.option("--force", is_flag=True, help="Migrate even though Redis looks consumed.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout, for scripts.")
@click.option(
    "--max-message-size",
    type=click.IntRange(1),
    default=DEFAULT_MAX_MESSAGE_SIZE,
    show_default=True,
    help="Bodies larger than the broker accepts are quarantined.",
)
@click.option("--key-prefix", default="", help="kombu's global_keyprefix, if the app used one.")
@click.option(
    "--blocked-timeout",
    type=click.FloatRange(0),
    default=300,
    show_default=True,
    help="Seconds to wait out a RabbitMQ resource alarm (connection.blocked) before failing.",
)
def migrate(
    source_url: str,
    queues: tuple[str, ...],
    dry_run: bool,
    report_file: Path | None,
    batch_size: int,
    include_unacked: bool,
    force: bool,
    as_json: bool,
    max_message_size: int,
    key_prefix: str,
    blocked_timeout: float,
    **flags: Any,
) -> None:
    """Move every pending Celery message from Redis to RabbitMQ, losing none.

    Each batch is confirmed by RabbitMQ before it is removed from Redis; a crash at any point
    leaves state from which rerunning the same command finishes the job. Exit codes: 0 done,
    4 done with quarantined messages, 3 refused (Redis still consumed), 2 usage, 1 failed.
    """
    env = _environment(flags)
    try:
        broker = broker_from_env(env)
        queue_settings = queues_from_env(env)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    options = MigrateOptions(
        queues=queues,
        batch_size=batch_size,
        include_unacked=include_unacked,
        force=force,
        max_message_size=max_message_size,
        blocked_timeout=blocked_timeout,
    )
    redis_display = _mask_redis(source_url)
    try:
        source = RedisSource.from_url(source_url, Keys(key_prefix))
        source.client.ping()
        plan = make_plan(source, queue_settings, options)
    except ValueError as exc:
        raise click.UsageError(f"--from: {exc}") from None
    except CONNECTION_ERRORS as exc:
        _fail(str(classify(exc, REDIS, redis_display)))
    if dry_run:
        if as_json:
            click.echo(json.dumps({"event": "plan", **plan.as_dict()}))
        else:
            _print_plan(plan)
        return
    total = sum(q.total for q in plan.queues) + plan.unacked_total
    progress = _Progress(total, as_json)
    try:
        report = Migration(source, broker, queue_settings, options, progress).run(plan)
    except Refused as exc:
        progress.close()
        click.echo(
            f"refused: {exc}\n  stop the Celery workers that use {redis_display}, or pass --force",
            err=True,
        )
        sys.exit(EXIT_REFUSED)
    except CONNECTION_ERRORS as exc:
        progress.close()
        _fail(_diagnose_run_error(exc, broker.display_url, broker.host, redis_display))
    progress.close()
    data = report.as_dict()
    if report_file is not None:
        report_file.write_text(json.dumps(data, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps({"event": "done", **data}))
    else:
        _print_summary(data)
    sys.exit(EXIT_QUARANTINED if data["quarantined"] else EXIT_OK)


def _diagnose_run_error(exc: BaseException, broker: str, host: str, redis_display: str) -> str:
    """A failure mid-run, blamed on the side that raised it (the run was connected to both)."""
    if isinstance(exc, redis.RedisError):
        return str(classify(exc, REDIS, redis_display, connected=True))
    return str(classify(exc, RABBITMQ, broker, host, connected=True))


def _print_summary(data: dict[str, Any]) -> None:
    for queue, count in data["migrated"].items():
        click.echo(f"  {queue:<28} {count:>8} migrated")
    click.echo(f"  unacked entries migrated: {data['unacked_migrated']}")
    if data["quarantined"]:
        click.echo(
            f"  quarantined (kept byte-exact in Redis list packit_broker.quarantine):"
            f" {data['quarantined']}"
        )
        for entry in data["quarantine"][:20]:
            click.echo(f"    {entry['source']!r}: {entry['reason']}")
    if data["possible_duplicates"]:
        click.echo(f"  possible duplicates after an earlier crash: {data['possible_duplicates']}")
    click.echo(f"  done in {data['seconds']:.1f}s")


def _mask_redis(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "redis://(unparsable URL)"
    auth = "***@" if parts.password else ""
    return f"{parts.scheme}://{auth}{host}{port}{parts.path}"


def _fail(message: str) -> None:
    click.echo(
        f"error: {message}\n  nothing was lost: what was not confirmed is still in Redis;"
        " rerun the same command to resume.",
        err=True,
    )
    sys.exit(EXIT_FAILED)
