"""`packit-broker migrate`: a thin click layer over packit_broker.migrate."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import amqp
import click
import redis

from packit_broker.config import (
    MIGRATE_FROM_VARIABLE,
    MIGRATE_TO_VARIABLE,
    BrokerEndpoint,
    ConfigError,
    broker_from_env,
    queues_from_env,
    redis_from_url,
)
from packit_broker.errors import RABBITMQ, REDIS, Diagnosed, classify
from packit_broker.kombu_layout import KombuLayout, LayoutError
from packit_broker.migrate import MigrateOptions, Migration, Plan, Refused, Report, make_plan
from packit_broker.migrate.amqp_sink import AmqpSink
from packit_broker.migrate.metrics import FollowMetrics
from packit_broker.migrate.progress import (
    PLAIN_INTERVAL,
    SHOWN_IDS,
    TTY_INTERVAL,
    Clock,
    Meter,
    Throttle,
    bar,
    counts,
    rate_text,
    shortened,
    summary,
    timestamp,
)
from packit_broker.migrate.redis_source import LockHeld, LockLost, MutexBusy, RedisSource
from packit_broker.migrate.report import POSSIBLE_DUPLICATES, REDELIVERED
from packit_broker.migrate.rollback import Rollback, RollbackOptions, RollbackPlan
from packit_broker.migrate.run import DEFAULT_MAX_MESSAGE_SIZE, RESURVEY_SECONDS, survey_etas
from packit_broker.recovery import RECONNECT_WINDOW

#: What a network, TLS, broker or Redis failure can raise; anything else is a bug and shows
#: its traceback.
CONNECTION_ERRORS = (OSError, EOFError, amqp.exceptions.AMQPError, redis.RedisError, Diagnosed)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_QUARANTINED, EXIT_INCOMPLETE = 0, 1, 2, 3, 4, 5
TRANSPORT_OPTIONS_VARIABLE = "PACKIT_MIGRATE_TRANSPORT_OPTIONS"
AMQP_SCHEMES = ("amqp", "amqps")
REDIS_SCHEMES = ("redis", "rediss", "unix")

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
    if plan.etas is not None and plan.etas.count:
        etas = plan.etas
        click.echo(
            f"  not yet due: {etas.count} tasks, the farthest in {etas.farthest_seconds:.0f} s;"
            f" {etas.delayed_delivery} through delayed delivery (quorum),"
            f" {etas.held_past_consumer_timeout} held by a worker past consumer_timeout"
        )
    for name, why in sorted(plan.skipped.items()):
        click.echo(f"  skipped {name!r}: {why} (never migrated)")
    for key, kind in sorted(plan.wrong_type.items()):
        click.echo(f"  skipped key {key!r}: a Redis {kind}, not what kombu keeps there")
    if plan.layout_refusal:
        click.echo(f"  refused, the transport options do not fit Redis: {plan.layout_refusal}")
    if plan.refusal:
        click.echo(f"  would refuse without --force: {plan.refusal}")


class _Progress:
    """What a run shows while it moves, where people look: a live line on a terminal (a bar
    with counts, rate and ETA; with --follow, moved and pending per queue), a plain line at
    most every PLAIN_INTERVAL in a pipe or a pod log, a JSON line per batch with --json."""

    def __init__(
        self,
        total: int,
        as_json: bool,
        *,
        follow: bool = False,
        name: str = "migrate",
        clock: Clock = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.as_json = as_json
        self.name = name
        self.done = 0
        self.total = total
        on_tty = sys.stderr.isatty() if tty is None else tty
        self.follow_line = follow and not as_json and on_tty
        self.tty_bar = not follow and not as_json and on_tty
        self.plain = not as_json and not on_tty
        self.meter = Meter(None if follow else total, clock)
        self.plain_due = Throttle(PLAIN_INTERVAL, clock)
        self.redraw_due = Throttle(TTY_INTERVAL, clock)
        self.moved: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self._drawn = False  # a live line is on the terminal, still without its newline
        self._shown: tuple[int, int | None] = (0, None)  # (moved, pending) of the last line
        self._lock = threading.RLock()  # the run, the ticker and notices print in turn
        self._stopped = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self) -> None:
        """Plain lines keep coming while nothing moves (a stalled run says so in the log)."""
        if self.plain and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stopped.wait(self.plain_due.remaining() + 0.01):
            with self._lock:
                if not self._stopped.is_set():
                    self._maybe_plain()

    def __call__(self, queue: str, count: int) -> None:
        with self._lock:
            self.done += count
            self.meter.add(count)
            self.moved[queue] = self.moved.get(queue, 0) + count
            if self.as_json:
                event = {
                    "event": "progress",
                    "queue": queue,
                    "moved": self.done,
                    "total": self.total,
                    "ts": timestamp(),
                    "rate": round(self.meter.rate(), 1),
                }
                click.echo(json.dumps(event))
            elif self.follow_line:
                self._line()
            elif self.tty_bar:
                if self.redraw_due.due():
                    self._draw()
            elif self.plain:
                self._maybe_plain()

    def show_pending(self, pending: dict[str, int]) -> None:
        """--follow: what is left in Redis per queue, refreshed every round."""
        with self._lock:
            if pending == self.pending:
                return
            self.pending = dict(pending)
            if self.follow_line:
                self._line()

    def _pending_total(self) -> int | None:
        return sum(self.pending.values()) if self.pending else None

    def _line(self) -> None:
        queues = sorted(set(self.moved) | set(self.pending))
        line = "  ".join(
            f"{q}: {self.moved.get(q, 0)} moved, {self.pending.get(q, 0)} pending" for q in queues
        )
        click.echo(f"\r{line}  ({rate_text(self.meter.rate())})\x1b[K", nl=False, err=True)
        self._drawn = True

    def _draw(self) -> None:
        click.echo(f"\r{bar(self.meter)} {counts(self.meter)}\x1b[K", nl=False, err=True)
        self._drawn = True

    def _maybe_plain(self) -> None:
        """A plain line if one is due; with --follow only if something changed (an idle
        bridge stays quiet), else always (a stalled run shows 0 msg/s)."""
        if not self.plain_due.due():
            return
        state = (self.meter.moved, self._pending_total())
        if self.meter.total is None and state == self._shown:
            return
        self._plain(state)

    def _plain(self, state: tuple[int, int | None]) -> None:
        self._shown = state
        click.echo(f"{self.name}: {counts(self.meter, state[1])}", err=True)

    def notify(self, text: str) -> None:
        """What the operator must see (a pause, a resume, the end), on its own line."""
        with self._lock:
            if self.as_json:
                click.echo(json.dumps({"event": "notice", "text": text}))
                return
            if self.follow_line:
                click.echo("\n" + text, err=True)
            else:
                click.echo(("\n" if self._drawn else "") + text, err=True)
            self._drawn = False

    def finish(self) -> None:
        """The run ended: the last counts, also in a log (whenever the last line was)."""
        self._stop_ticker()
        with self._lock:
            if self.tty_bar:
                self._draw()
            elif self.plain:
                self._plain((self.meter.moved, self._pending_total()))
            self._end_line()

    def close(self) -> None:
        """The run failed or was refused: no more lines, the terminal's line ended."""
        self._stop_ticker()
        with self._lock:
            self._end_line()

    def _stop_ticker(self) -> None:
        """Called without the lock held: the ticker may be waiting for it."""
        self._stopped.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1)

    def _end_line(self) -> None:
        if self._drawn:
            click.echo("", err=True)
            self._drawn = False


@click.command()
@click.option(
    "--from",
    "source_url",
    required=True,
    envvar=MIGRATE_FROM_VARIABLE,
    show_envvar=True,
    metavar="redis://[:PASSWORD@]HOST:PORT/DB | amqps://...",
    help="The broker to drain (the environment variable keeps its password out of argv). An"
    " amqps:// URL rolls back: RabbitMQ -> the Redis named by --to.",
)
@click.option(
    "--to",
    envvar=MIGRATE_TO_VARIABLE,
    show_envvar=True,
    metavar="amqps://USER:PASSWORD@HOST:PORT/VHOST | redis://...",
    help="Destination; without it or its env var, PACKIT_BROKER_URL. A redis:// URL for a"
    " rollback.",
)
@click.option("--ca-file", type=click.Path(dir_okay=False), help="PACKIT_BROKER_CA_FILE")
@click.option("--cert-file", type=click.Path(dir_okay=False), help="PACKIT_BROKER_CERT_FILE")
@click.option("--key-file", type=click.Path(dir_okay=False), help="PACKIT_BROKER_KEY_FILE")
@click.option("--connect-to", metavar="ADDRESS:PORT", help="PACKIT_BROKER_CONNECT_TO")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    help="Only this queue (repeatable). Default: configured + found in Redis (rollback: the"
    " configured ones that exist in RabbitMQ).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan and exit as the real run would start (3 if it would refuse, 1 if"
    " RabbitMQ cannot be reached or a queue exists with other arguments); change nothing.",
)
@click.option(
    "--offline",
    is_flag=True,
    help="With --dry-run: do not dial RabbitMQ (the plan from Redis alone).",
)
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
    "--transport-options",
    "transport_options",
    envvar=TRANSPORT_OPTIONS_VARIABLE,
    metavar="JSON",
    help="The app's broker_transport_options as JSON (sep, priority_steps, global_keyprefix,"
    f" unacked_key, ...); default: {TRANSPORT_OPTIONS_VARIABLE}.",
)
@click.option(
    "--blocked-timeout",
    type=click.FloatRange(0),
    default=300,
    show_default=True,
    help="Seconds to wait out a RabbitMQ resource alarm (connection.blocked) before failing.",
)
@click.option(
    "--nack-retry-seconds",
    type=click.FloatRange(0),
    default=30,
    show_default=True,
    help="Seconds to keep publishing again what RabbitMQ nacks (a quorum queue electing a"
    " leader) before a message is taken for poison, or its queue for unavailable.",
)
@click.option(
    "--reconnect-seconds",
    type=click.FloatRange(0),
    default=RECONNECT_WINDOW,
    show_default=True,
    help="After losing RabbitMQ mid-run, keep reconnecting this long (backoff 1, 2, 4 ... 15 s)"
    " before failing; what was in flight is sent again and listed as possible duplicates."
    " --follow reconnects without limit.",
)
@click.option(
    "--follow",
    is_flag=True,
    help="After the backlog, keep moving what producers still push into Redis, until"
    " SIGTERM/SIGINT (finish the batch in flight, write the report, exit 0) or --until-idle.",
)
@click.option(
    "--until-idle",
    type=click.FloatRange(0, min_open=True),
    metavar="SECONDS",
    help="With --follow: stop once the selected queues stayed empty this long.",
)
@click.option(
    "--resurvey-seconds",
    type=click.FloatRange(0.5),
    default=RESURVEY_SECONDS,
    show_default=True,
    help="With --follow: how often Redis is surveyed again for queues that appeared and for"
    " unacked entries a killed Redis worker left (a survey scans the keyspace).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="With --follow: serve Prometheus metrics at http://ADDRESS:PORT/metrics.",
)
@click.option(
    "--metrics-address",
    default="0.0.0.0",
    show_default=True,
    envvar="PACKIT_MIGRATE_METRICS_ADDRESS",
    show_envvar=True,
    help="The address --metrics-port binds (0.0.0.0: every interface, as a pod's Prometheus"
    " scrape needs; 127.0.0.1 on a shared host).",
)
def migrate(
    source_url: str,
    queues: tuple[str, ...],
    dry_run: bool,
    offline: bool,
    report_file: Path | None,
    batch_size: int,
    include_unacked: bool,
    force: bool,
    as_json: bool,
    max_message_size: int,
    key_prefix: str,
    transport_options: str | None,
    blocked_timeout: float,
    nack_retry_seconds: float,
    reconnect_seconds: float,
    follow: bool,
    until_idle: float | None,
    resurvey_seconds: float,
    metrics_port: int | None,
    metrics_address: str,
    **flags: Any,
) -> None:
    """Move every pending Celery message from Redis to RabbitMQ, losing none.

    Each batch is confirmed by RabbitMQ before it is removed from Redis; a crash at any point
    leaves state from which rerunning the same command finishes the job. Exit codes: 0 done,
    4 done with quarantined messages, 5 done but something of the selected queues is still in
    Redis (named), 3 refused (Redis still consumed, another layout, another migrator running),
    2 usage, 1 failed. With --follow: 0 after SIGTERM/SIGINT or --until-idle (the report
    names what is still pending and every possible duplicate).

    Rollback (RabbitMQ -> Redis): PACKIT_MIGRATE_FROM=amqps://... PACKIT_MIGRATE_TO=redis://...
    Each batch is written to Redis (with the in-flight journal, in one transaction), then
    acknowledged in RabbitMQ; undecodable messages stay in RabbitMQ (exit 4); 3 refused also
    when another client consumes a selected RabbitMQ queue (--force overrides, --follow
    pauses) or a --queue does not exist; 5 when something of the selected queues is still in
    RabbitMQ. --include-unacked, --max-message-size, --blocked-timeout and --nack-retry-seconds
    are for the forward direction only.
    """
    if (until_idle is not None or metrics_port is not None) and not follow:
        raise click.UsageError("--until-idle and --metrics-port need --follow")
    metrics_at = None if metrics_port is None else (metrics_address, metrics_port)
    if offline and not dry_run:
        raise click.UsageError("--offline goes with --dry-run")
    to_url = flags.pop("to") or None
    if _scheme(source_url) in AMQP_SCHEMES:
        # The AMQP side is parsed as PACKIT_BROKER_URL, with the CA/cert/connect-to flags.
        env = _environment({**flags, "to": source_url})
        _rollback(
            env,
            to_url,
            _layout(transport_options, key_prefix),
            RollbackOptions(
                queues=queues,
                batch_size=batch_size,
                force=force,
                follow=follow,
                until_idle=until_idle,
            ),
            dry_run=dry_run,
            report_file=report_file,
            as_json=as_json,
            metrics_at=metrics_at,
        )
    if to_url is not None and _scheme(to_url) in REDIS_SCHEMES:
        raise click.UsageError(
            "--to is a Redis URL but --from is not RabbitMQ: a rollback goes --from amqps://..."
            " --to redis://..."
        )
    env = _environment({**flags, "to": to_url})
    if not env.get(FLAG_VARIABLES["to"], "").strip():
        raise click.UsageError(
            f"Missing option '--to' (env var: '{MIGRATE_TO_VARIABLE}', or"
            f" '{FLAG_VARIABLES['to']}'): expected amqps://USER:PASSWORD@ROUTE_HOST:443/VHOST"
        )
    try:
        broker = broker_from_env(env)
        queue_settings = queues_from_env(env)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    layout = _layout(transport_options, key_prefix)
    if report_file is not None and not dry_run:
        _check_report_path(report_file)
    options = MigrateOptions(
        queues=queues,
        batch_size=batch_size,
        include_unacked=include_unacked,
        force=force,
        max_message_size=max_message_size,
        blocked_timeout=blocked_timeout,
        nack_retry_seconds=nack_retry_seconds,
        reconnect_seconds=reconnect_seconds,
        follow=follow,
        until_idle=until_idle,
        resurvey_seconds=resurvey_seconds,
    )
    try:
        redis_display = redis_from_url(source_url).display_url
    except ConfigError as exc:
        raise click.UsageError(f"--from: {exc}") from None
    try:
        source = RedisSource.from_url(source_url, layout)
        source.client.ping()
        plan = make_plan(source, queue_settings, options)
    except ValueError as exc:
        raise click.UsageError(f"--from: {exc}") from None
    except CONNECTION_ERRORS as exc:
        _fail(str(classify(exc, REDIS, redis_display)))
    if dry_run:
        plan.etas = survey_etas(source, plan)
        if as_json:
            click.echo(json.dumps({"event": "plan", **plan.as_dict()}))
        else:
            _print_plan(plan)
        # As Migration.run decides: a bridge waits for a live consumer, not for fresh unacked.
        waits = follow and not plan.fresh_unacked
        refused = plan.layout_refusal or (None if force or waits else plan.refusal)
        if refused:
            click.echo(f"refused (as the real run would be): {refused}", err=True)
            sys.exit(EXIT_REFUSED)
        if not offline:
            try:
                _dial_destination(broker, plan)
            except CONNECTION_ERRORS as exc:
                _fail(str(classify(exc, RABBITMQ, broker.display_url, broker.host)))
        sys.exit(EXIT_OK)
    total = sum(q.total for q in plan.queues) + plan.unacked_total
    progress = _Progress(total, as_json, follow=follow)
    stop = threading.Event()
    metrics = _serve_metrics(metrics_at) if follow else None
    caught: list[str] = []
    _stop_on_signals(stop, caught)
    try:
        migration = Migration(
            source,
            broker,
            queue_settings,
            options,
            progress,
            stop=stop,
            metrics=metrics,
            notify=progress.notify,
            show_pending=progress.show_pending,
        )
        progress.start()
        report = migration.run(plan)
        _say_stopped(caught, progress.notify)
    except Refused as exc:
        fix = (
            f"set --transport-options (or {TRANSPORT_OPTIONS_VARIABLE}) to the app's"
            " broker_transport_options; nothing was changed"
            if plan.layout_refusal
            else f"stop the Celery workers that use {redis_display}, or pass --force"
        )
        _refuse(progress, f"[redis] {exc}\n  {fix}")
    except LockHeld as exc:
        _refuse(progress, _lock_held(exc, redis_display))
    except MutexBusy as exc:
        _refuse(progress, f"[redis] {exc}")
    except LockLost as exc:
        progress.close()
        _fail(f"[redis] {exc}")
    except CONNECTION_ERRORS as exc:
        progress.close()
        _fail(_diagnose_run_error(exc, broker.display_url, broker.host, redis_display))
    _end(progress, report, report_file, as_json, source, stopped=follow and stop.is_set())


def _dial_destination(broker: BrokerEndpoint, plan: Plan) -> None:
    """A dry run's look at RabbitMQ, changing nothing: log in, and check each planned queue
    that exists against the workers' declaration (`AmqpSink.check_existing`)."""
    sink = AmqpSink(broker).connect()
    try:
        for queue_plan in plan.queues:
            sink.check_existing(queue_plan.spec)
    finally:
        sink.close()


def _scheme(url: str) -> str:
    """The URL's scheme, lower-cased ('' if none); never echoes the rest (a secret)."""
    head, sep, _ = url.strip().partition("://")
    return head.lower() if sep else ""


def _rollback(
    env: dict[str, str],
    to_url: str | None,
    layout: KombuLayout,
    options: RollbackOptions,
    *,
    dry_run: bool,
    report_file: Path | None,
    as_json: bool,
    metrics_at: tuple[str, int] | None,
) -> None:
    """RabbitMQ -> Redis. Same exit codes as forward; never returns."""
    if to_url is None or _scheme(to_url) not in REDIS_SCHEMES:
        raise click.UsageError(
            f"a rollback (--from amqps://...) needs --to redis://... (or {MIGRATE_TO_VARIABLE},"
            " which keeps its password out of argv)"
        )
    try:
        broker = broker_from_env(env)
        queue_settings = queues_from_env(env)
    except ConfigError as exc:
        raise click.UsageError(f"--from (the RabbitMQ side of a rollback): {exc}") from None
    try:
        target = redis_from_url(to_url, MIGRATE_TO_VARIABLE)
    except ConfigError as exc:
        raise click.UsageError(f"--to: {exc}") from None
    if report_file is not None and not dry_run:
        _check_report_path(report_file)
    store = RedisSource.from_url(to_url, layout)
    stop = threading.Event()
    # No bar before the plan has counted the messages (the real one is made then).
    progress = _Progress(0, as_json, follow=True)
    # Served before anything is dialled: a port in use is a usage error, not Redis's.
    metrics = _serve_metrics(metrics_at) if metrics_at is not None else None
    rollback = Rollback(broker, store, queue_settings, options, stop=stop, metrics=metrics)
    side, where = RABBITMQ, (broker.display_url, broker.host)
    try:
        with rollback:
            plan = rollback.plan()
            side, where = REDIS, (target.display_url, target.host)
            store.client.ping()
            rollback.check_destination(plan)
            if dry_run:
                _show_rollback_plan(plan, as_json)
                refused = plan.selection_refusal or plan.layout_refusal
                sys.exit(EXIT_REFUSED if refused else EXIT_OK)
            progress = _Progress(
                sum(q.ready for q in plan.queues), as_json, follow=options.follow, name="rollback"
            )
            rollback.progress, rollback.notify = progress, progress.notify
            caught: list[str] = []
            _stop_on_signals(stop, caught)
            side = ""
            progress.start()
            report = rollback.run(plan)
            _say_stopped(caught, progress.notify)
    except Refused as exc:
        if plan.layout_refusal:
            _refuse(
                progress,
                f"[redis] {exc}\n  set --transport-options (or {TRANSPORT_OPTIONS_VARIABLE}) to"
                " the Redis app's broker_transport_options; nothing was changed",
            )
        fix = (
            "nothing was changed"
            if plan.selection_refusal
            else "stop the Celery workers that consume these RabbitMQ queues, or pass --force"
        )
        _refuse(progress, f"[rabbitmq] {exc}\n  {fix}")
    except LockHeld as exc:
        _refuse(progress, _lock_held(exc, target.display_url))
    except LockLost as exc:
        progress.close()
        _fail(f"[redis] {exc}", kept_in="RabbitMQ")
    except CONNECTION_ERRORS as exc:
        progress.close()
        if side:
            _fail(str(classify(exc, side, *where)), kept_in="RabbitMQ")
        _fail(
            _diagnose_run_error(exc, broker.display_url, broker.host, target.display_url),
            kept_in="RabbitMQ",
        )
    _end(progress, report, report_file, as_json, store, stopped=options.follow and stop.is_set())


# -- what both directions do at their end -----------------------------------------------------


#: What ends a run cleanly (the batches in flight finished, the report written): a Deployment's
#: stop, Ctrl-C, a closed terminal or session. A second one of them ends it at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_on_signals(stop: threading.Event, caught: list[str]) -> None:
    """Each stop signal sets `stop` (the run finishes what is in flight and reports: exit 0
    for --follow, the report's own code for a one-shot run) and is named in `caught`, said
    once the run has stopped (a handler that prints could interrupt a print); a second one
    is not caught."""

    def handle(signum: int, frame: object) -> None:
        caught.append(signal.Signals(signum).name)
        stop.set()
        for again in STOP_SIGNALS:
            signal.signal(again, signal.SIG_DFL)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)


def _say_stopped(caught: list[str], notify: Callable[[str], None]) -> None:
    if caught:
        notify(f"{caught[0]}: stopped after the batches in flight; the report follows")


def _serve_metrics(at: tuple[str, int] | None) -> FollowMetrics:
    """A following run's metrics, served at (address, port) if given; one that cannot be
    bound is a usage error (exit 2), said before anything moves."""
    metrics = FollowMetrics()
    if at is not None:
        address, port = at
        try:
            metrics.serve(port, address)
        except (OSError, ValueError) as exc:
            raise click.UsageError(
                f"--metrics-port {port} on --metrics-address {address}: cannot serve metrics"
                f" there ({getattr(exc, 'strerror', None) or exc}); choose a free port and an"
                " address of this host"
            ) from None
    return metrics


def _refuse(progress: _Progress, text: str) -> NoReturn:
    """Refused before anything moved (exit 3): `text` names the side, the reason, the fix."""
    progress.close()
    click.echo(f"refused: {text}", err=True)
    sys.exit(EXIT_REFUSED)


def _lock_held(exc: LockHeld, redis_display: str) -> str:
    return (
        f"[redis] another migration or rollback using {redis_display} is running:"
        f" {exc.holder}\n  wait for it to finish (a crashed run's lock is taken over"
        " automatically)"
    )


def _end(
    progress: _Progress,
    report: Report,
    report_file: Path | None,
    as_json: bool,
    store: RedisSource,
    *,
    stopped: bool,
) -> NoReturn:
    """Write the report, then let Redis forget the possible duplicates it now lists (not
    before: a crash in between keeps them for the next run's report); exit by the report,
    or 0 for a following run stopped by a signal. Ids the terminal showed only some of are
    not forgotten without a report file: the next run reports them again."""
    progress.finish()
    told = _finish(report, report_file, as_json, name=progress.name, stopped=stopped)
    for name, ids in report.evidence().items():
        if name in told:
            store.forget_reported(name, ids)
    sys.exit(EXIT_OK if stopped else _exit_code(report))


def _show_rollback_plan(plan: RollbackPlan, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"event": "plan", **plan.as_dict()}))
        return
    click.echo("Rollback plan, RabbitMQ -> Redis (nothing has been changed):")
    for q in plan.queues:
        click.echo(f"  {q.spec.name:<28} {q.ready:>8} messages; {q.consumers} consumer(s)")
    for name, why in sorted(plan.skipped.items()):
        click.echo(f"  skipped {name!r}: {why}")
    if plan.selection_refusal:
        click.echo(f"  refused: {plan.selection_refusal}")
    if plan.layout_refusal:
        click.echo(f"  refused, the transport options do not fit Redis: {plan.layout_refusal}")
    if plan.refusal:
        click.echo(f"  would refuse without --force: {plan.refusal}")


def _finish(
    report: Report, report_file: Path | None, as_json: bool, *, name: str, stopped: bool
) -> set[str]:
    """The report: to the file (atomically), then stdout; the evidence lists (by their Redis
    names) that were said in full, by the file or on stdout."""
    data = report.as_dict()
    if report_file is not None:
        _write_atomically(report_file, json.dumps(data, indent=2) + "\n")
    state = "stopped" if stopped else "done" if report.complete else "incomplete"
    line = summary(
        name,
        state=state,
        moved=report.total,
        seconds=report.seconds,
        report_path=None if report_file is None else str(report_file),
        quarantined=len(report.quarantine),
        possible_duplicates=len(data["possible_duplicates"]),
    )
    if as_json:
        click.echo(json.dumps({"event": "done", **data}))
        click.echo(line, err=True)  # stdout stays JSON lines
        return set(report.evidence())
    shortened_lists = _print_summary(data, None if report_file is None else str(report_file))
    click.echo(line)
    if report_file is not None:
        return set(report.evidence())
    lists = {POSSIBLE_DUPLICATES: "possible_duplicates", REDELIVERED: "redelivered"}
    return {name for name in report.evidence() if lists.get(name) not in shortened_lists}


def _exit_code(report: Report) -> int:
    if not report.complete:
        return EXIT_INCOMPLETE
    return EXIT_QUARANTINED if report.quarantine else EXIT_OK


def _layout(transport_options: str | None, key_prefix: str) -> KombuLayout:
    """The layout from --transport-options / the environment, with --key-prefix folded in."""
    try:
        layout = KombuLayout.from_json(transport_options or "{}")
    except LayoutError as exc:
        raise click.UsageError(f"--transport-options: {exc}") from None
    if key_prefix:
        if layout.global_keyprefix not in ("", key_prefix):
            raise click.UsageError(
                "--key-prefix and global_keyprefix in --transport-options disagree; give one"
            )
        layout = dataclasses.replace(layout, global_keyprefix=key_prefix)
    return layout


def _check_report_path(path: Path) -> None:
    """Fail before anything moves if the report could not be written afterwards."""
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise click.UsageError(f"--report {path}: is a directory")
    if not directory.is_dir():
        raise click.UsageError(f"--report {path}: directory {directory} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".packit-report-"):
            pass
    except OSError as exc:
        raise click.UsageError(f"--report {path}: cannot write there ({exc.strerror})") from None


def _write_atomically(path: Path, text: str) -> None:
    """A reader (or a crash) sees the old file or the whole new one, never half of it."""
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=".packit-report-", delete=False
    ) as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(out.name, path)


def _diagnose_run_error(exc: BaseException, broker: str, host: str, redis_display: str) -> str:
    """A failure mid-run, blamed on the side that raised it (the run was connected to both)."""
    if isinstance(exc, redis.RedisError):
        return str(classify(exc, REDIS, redis_display, connected=True))
    return str(classify(exc, RABBITMQ, broker, host, connected=True))


def _print_summary(data: dict[str, Any], report_path: str | None) -> set[str]:
    """The report for a person: counts, and of each long list a few items, the rest named by
    where it is; the keys of `data` whose list was shortened."""
    rollback = data.get("direction") == "rollback"
    source = "RabbitMQ" if rollback else "Redis"
    shortened_lists: set[str] = set()

    def some(key: str, items: list[str], kept: str) -> str:
        text, whole = shortened(items, report_path, kept=kept)
        if not whole:
            shortened_lists.add(key)
        return text

    for queue, count in data["migrated"].items():
        click.echo(f"  {queue:<28} {count:>8} migrated")
    if not rollback:
        click.echo(f"  unacked entries migrated: {data['unacked_migrated']}")
    if data["quarantined"]:
        kept = (
            "left unacknowledged in their RabbitMQ queues, bodies in the report"
            if rollback
            else "kept byte-exact in Redis list packit_broker.quarantine"
        )
        click.echo(f"  quarantined ({kept}): {data['quarantined']}")
        entries = data["quarantine"]
        for entry in entries[:SHOWN_IDS]:
            click.echo(f"    {entry['source']!r}: {entry['reason']}")
        if len(entries) > SHOWN_IDS:
            where = (
                f"in {report_path}"
                if report_path
                else "(still in RabbitMQ: rerun with --report FILE to get them all)"
                if rollback
                else "(in packit_broker.quarantine: --report FILE lists every reason)"
            )
            click.echo(f"    ... {len(entries) - SHOWN_IDS} more {where}")
    for item in data["skipped"]:
        click.echo(f"  skipped {item['name']!r}: {item['reason']}")
    for item in data["wrong_type"]:
        click.echo(f"  skipped key {item['key']!r}: a Redis {item['type']}, not migrated")
    for where, count in data["remaining"].items():
        click.echo(f"  still in {source} after the run: {count} in {where!r} (rerun to move them)")
    if data["taken_over_from"]:
        click.echo(f"  took over the lock of a crashed run: {data['taken_over_from']}")
    rerun = "(kept in Redis: rerun with --report FILE to get them all)"
    if duplicates := data["possible_duplicates"]:
        click.echo(
            f"  possible duplicates (in flight at a crash or a lost connection):"
            f" {len(duplicates)}: {some('possible_duplicates', duplicates, rerun)}"
        )
    if redelivered := data.get("redelivered"):
        click.echo(
            "  redelivered by RabbitMQ (a consumer had them before: a stopped worker, perhaps"
            f" mid-task, an earlier run, a node restart): {len(redelivered)}:"
            f" {some('redelivered', redelivered, rerun)}"
        )
    return shortened_lists


def _fail(message: str, kept_in: str = "Redis") -> NoReturn:
    click.echo(
        f"error: {message}\n  nothing was lost: what was not confirmed is still in {kept_in};"
        " rerun the same command to resume.",
        err=True,
    )
    sys.exit(EXIT_FAILED)
