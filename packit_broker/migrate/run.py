"""The migration: plan, refuse if Redis is still consumed or laid out otherwise, move, verify.

Order: the `unacked` entries first (a killed worker's and countdown tasks, ahead of their
queue's backlog, as kombu would have restored them), then per queue the priority buckets in
kombu's order, oldest first - the order Redis workers would have taken them. Afterwards the
selected queues are read again: whatever is still there is reported, not assumed away.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from packit_broker import delayed_delivery, errors
from packit_broker.config import BrokerEndpoint
from packit_broker.delayed_delivery import EtaSummary
from packit_broker.envelope import (
    AmqpMessage,
    MalformedMessage,
    decode,
    split_unacked,
)
from packit_broker.kombu_layout import KombuLayout
from packit_broker.migrate.amqp_sink import (
    DEFAULT_BLOCKED_TIMEOUT,
    DEFAULT_NACK_RETRY_SECONDS,
    AmqpSink,
)
from packit_broker.migrate.driver import Driver, Progress
from packit_broker.migrate.metrics import FollowMetrics
from packit_broker.migrate.protocols import Lane, Rejection
from packit_broker.migrate.redis_source import (
    LiveConsumer,
    RedisSource,
    RunLock,
    Survey,
    UnackedEntry,
    locked_run,
)
from packit_broker.migrate.report import QuarantinedEntry, Report, skipped_list, wrong_type_list
from packit_broker.queues import QueueSettings, QueueSpec
from packit_broker.recovery import RECONNECT_MAX_PAUSE, RECONNECT_WINDOW, Backoff

#: --follow: how often the bridge surveys Redis again for queues that appeared since it started
#: and for unacked entries a Redis worker left behind (once no Redis consumer is left); a
#: survey scans the keyspace, so not more often on a large database.
RESURVEY_SECONDS = 30.0

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size
Bindings = dict[str, set[tuple[str, str]]]


@dataclass(frozen=True)
class MigrateOptions:
    queues: tuple[str, ...] = ()  # explicit selection; empty: configured + found in Redis
    batch_size: int = 1000
    include_unacked: bool = True
    force: bool = False
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    fresh_unacked_seconds: float = 300.0
    recent_consumer_seconds: float = 300.0
    lock_ttl_seconds: float = 30.0
    blocked_timeout: float = DEFAULT_BLOCKED_TIMEOUT  # how long a RabbitMQ alarm is waited out
    nack_retry_seconds: float = DEFAULT_NACK_RETRY_SECONDS  # how long nacked ones are retried
    follow: bool = False  # after the backlog, keep moving what producers still push
    until_idle: float | None = None  # --follow ends once the queues stayed empty this long
    poll_seconds: float = 0.1  # --follow: pause between rounds that found nothing
    resurvey_seconds: float = RESURVEY_SECONDS  # --follow: how often Redis is surveyed again
    #: one-shot: how long after losing RabbitMQ mid-run to keep reconnecting (--follow: always)
    reconnect_seconds: float = RECONNECT_WINDOW


@dataclass
class QueuePlan:
    spec: QueueSpec
    origin: str  # configured | redis | binding | requested
    counts: dict[int, int]  # priority step -> messages
    keys: dict[int, str]  # priority step -> list key (only keys that are lists or absent)
    unacked: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass
class Plan:
    queues: list[QueuePlan]
    unacked_total: int
    live_consumers: list[LiveConsumer]
    fresh_unacked: int
    bindings: Bindings = field(default_factory=dict)  # kombu's, per queue
    layout: KombuLayout = field(default_factory=KombuLayout)
    known: set[str] = field(default_factory=set)  # every queue Redis knows of
    skipped: dict[str, str] = field(default_factory=dict)  # control traffic: name -> why
    wrong_type: dict[str, str] = field(default_factory=dict)  # key -> its type
    layout_problems: list[str] = field(default_factory=list)
    unacked_readable: bool = True
    etas: EtaSummary | None = None  # tasks not yet due; a dry run reads them (survey_etas)

    @property
    def refusal(self) -> str | None:
        """Why Redis looks still consumed (`--force` overrides)."""
        reasons = [f"a client is consuming from Redis: {c}" for c in self.live_consumers]
        if self.fresh_unacked:
            reasons.append(
                f"{self.fresh_unacked} unacked entries were delivered in the last minutes"
                " (a worker may still be running them)"
            )
        return "; ".join(reasons) or None

    @property
    def layout_refusal(self) -> str | None:
        """Why the configured layout does not fit the data (not overridable: it would strand
        or misroute messages)."""
        return "; ".join(self.layout_problems) or None

    def as_dict(self) -> dict[str, Any]:
        return {
            "queues": [
                {
                    "name": q.spec.name,
                    "origin": q.origin,
                    "declare": {"durable": True, "arguments": q.spec.arguments},
                    "priority_buckets": {str(step): n for step, n in q.counts.items()},
                    "messages": q.total,
                    "unacked": q.unacked,
                }
                for q in self.queues
            ],
            "unacked": self.unacked_total,
            "live_consumers": [str(c) for c in self.live_consumers],
            "fresh_unacked": self.fresh_unacked,
            "skipped": skipped_list(self.skipped),
            "wrong_type": wrong_type_list(self.wrong_type),
            "layout": self.layout.as_options(),
            "layout_problems": list(self.layout_problems),
            **({"eta_tasks": self.etas.as_dict()} if self.etas is not None else {}),
        }


class Refused(RuntimeError):
    """Redis is still being consumed, or holds another layout than configured; migrating now
    could lose, strand or double tasks."""


# -- planning ---------------------------------------------------------------------------------


def unacked_targets(
    exchange: str, routing_key: str, bindings: Bindings, known: set[str]
) -> list[str]:
    """Where kombu would have restored an unacked entry: its binding, else its routing key."""
    bound = sorted(q for q, pairs in bindings.items() if (exchange, routing_key) in pairs)
    if bound:
        return bound
    return [routing_key] if routing_key in known else []


#: Entries read per LRANGE by `survey_etas` (bounds its memory by the entries' size).
ETA_SURVEY_CHUNK = 500


def survey_etas(source: RedisSource, plan: Plan, now: dt.datetime | None = None) -> EtaSummary:
    """How many of the planned queues' tasks are not yet due, how far ahead, and how each will
    wait at the destination (read-only: the lists are read in chunks, nothing is taken)."""
    now = now or dt.datetime.now(dt.UTC)
    summary = EtaSummary()
    for queue in plan.queues:
        for step, key in queue.keys.items():
            for start in range(0, queue.counts.get(step, 0), ETA_SURVEY_CHUNK):
                for raw in source.client.lrange(key, start, start + ETA_SURVEY_CHUNK - 1):
                    headers = _headers_of(raw)
                    route = delayed_delivery.delayed_route(queue.spec, headers, now)
                    seconds = delayed_delivery.delay_seconds(headers, now)
                    summary.add(queue.spec, seconds, route is not None)
    return summary


def _headers_of(raw: bytes) -> dict[str, Any]:
    """The headers of a kombu Redis envelope; {} for what is not one (quarantined later)."""
    try:
        envelope = json.loads(raw)
    except ValueError:
        return {}
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    return headers if isinstance(headers, dict) else {}


def make_plan(source: RedisSource, queues: QueueSettings, options: MigrateOptions) -> Plan:
    """Read-only: what is where, what would be refused, skipped or moved."""
    survey = source.survey()
    layout = source.layout
    known = set(queues.names) | set(options.queues) | survey.list_queues | set(survey.bindings)
    origins = _origins(survey, queues, options)
    wanted = {name: layout.bucket_keys(name) for name in origins}
    wrong = _wrong_types(source, survey, wanted)
    readable = {n: {s: k for s, k in keys.items() if k not in wrong} for n, keys in wanted.items()}
    flat = [k for keys in readable.values() for k in keys.values()]
    lengths = dict(zip(flat, source.lengths(flat), strict=True))
    plans = {
        name: QueuePlan(
            queues.spec(name),
            origin,
            {s: lengths[k] for s, k in readable[name].items()},
            readable[name],
        )
        for name, origin in origins.items()
    }
    unacked_readable = layout.unacked not in wrong and layout.unacked_index not in wrong
    targeted: set[str] = set()
    if options.include_unacked and unacked_readable:
        for entry in source.unacked():
            for target in _entry_targets(entry, survey.bindings, known):
                targeted.add(target)
                if target in plans:
                    plans[target].unacked += 1
    problems = _layout_problems(survey, layout, options)
    for name in (q for q in options.queues if q in plans):
        found = plans[name].total or name in survey.bindings or name in targeted
        if not found and not _bad(wanted[name], wrong):
            problems.append(
                f"--queue {name!r} is nowhere in Redis (no list in any priority bucket, no"
                " binding, no unacked entry): check its spelling and the transport options"
            )
    fresh = source.fresh_unacked(options.fresh_unacked_seconds) if unacked_readable else 0
    return Plan(
        queues=list(plans.values()),
        unacked_total=sum(p.unacked for p in plans.values()),
        live_consumers=source.live_consumers(options.recent_consumer_seconds),
        fresh_unacked=fresh if options.include_unacked else 0,
        bindings=survey.bindings,
        layout=layout,
        known=known,
        skipped=dict(survey.skipped),
        wrong_type=wrong,
        layout_problems=problems,
        unacked_readable=unacked_readable,
    )


def _origins(survey: Survey, queues: QueueSettings, options: MigrateOptions) -> dict[str, str]:
    """queue -> why it is in the plan; Celery's control traffic never is."""
    if options.queues:
        origins = dict.fromkeys(options.queues, "requested")
    else:
        origins = dict.fromkeys(queues.names, "configured")
        for name in sorted(survey.list_queues):
            origins.setdefault(name, "redis")
        for name in sorted(survey.bindings):
            origins.setdefault(name, "binding")
    return {name: why for name, why in origins.items() if name not in survey.skipped}


def _wrong_types(
    source: RedisSource, survey: Survey, wanted: dict[str, dict[int, str]]
) -> dict[str, str]:
    """Keys kombu would read that hold another Redis type: named, then left alone."""
    layout = source.layout
    expected = {k: "list" for keys in wanted.values() for k in keys.values()}
    expected.update({layout.unacked: "hash", layout.unacked_index: "zset"})
    wrong = dict(survey.wrong_type)
    for key, kind in source.types(list(expected)).items():
        if kind not in (expected[key], "none"):
            wrong[key] = kind
    return wrong


def _layout_problems(survey: Survey, layout: KombuLayout, options: MigrateOptions) -> list[str]:
    problems = list(survey.mismatches)
    if survey.foreign_prefixes and not options.queues:
        shown = ", ".join(repr(p) for p in sorted(survey.foreign_prefixes))
        problems.append(
            f"Redis holds kombu keys under global_keyprefix {shown}, not"
            f" {layout.global_keyprefix!r}: set global_keyprefix as the app does"
            " (or select queues with --queue)"
        )
    return problems


def _bad(keys: dict[int, str], wrong: dict[str, str]) -> bool:
    return any(k in wrong for k in keys.values())


def _entry_targets(entry: UnackedEntry, bindings: Bindings, known: set[str]) -> list[str]:
    try:
        _, exchange, routing_key = split_unacked(entry.value)
    except MalformedMessage:
        return []
    return unacked_targets(exchange, routing_key, bindings, known)


# -- moving -----------------------------------------------------------------------------------


class Migration:
    """One run. Every batch: decode, mark in flight, publish + confirm, then remove."""

    def __init__(
        self,
        source: RedisSource,
        broker: BrokerEndpoint,
        queues: QueueSettings,
        options: MigrateOptions,
        progress: Progress | None = None,
        *,
        stop: threading.Event | None = None,
        metrics: FollowMetrics | None = None,
        notify: Callable[[str], None] | None = None,
        show_pending: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.source = source
        self.broker = broker
        self.queues = queues
        self.options = options
        self.progress = progress or (lambda queue, n: None)
        self.report = Report()
        self.lock: RunLock | None = None
        self.stop = stop or threading.Event()  # set by SIGTERM/SIGINT: finish, then report
        self.metrics = metrics
        if metrics is not None:
            metrics.watch(self.report)
            self.progress = metrics.counting(self.progress)
        self.notify = notify or (lambda text: None)
        self.show_pending = show_pending or (lambda pending: None)
        self._backoff: Backoff | None = None  # the reconnect backoff of an outage going on
        self._progressed = False  # a batch was committed over the current connection
        self._relost = 0  # reconnects of the current outage that were lost again at once
        self._unacked_moved = False  # the plan's unacked entries are done (not redone)

    def run(self, plan: Plan) -> Report:
        """Refusals first (nothing touched), then the run lock, then the moves."""
        started = time.monotonic()
        if plan.layout_refusal:
            raise Refused(plan.layout_refusal)
        # A following bridge may start before the last Redis worker is gone: it pauses (loudly)
        # until then instead of refusing; recently delivered unacked entries still refuse.
        waits = self.options.follow and not plan.fresh_unacked
        if plan.refusal and not self.options.force and not waits:
            raise Refused(plan.refusal)
        with locked_run(self.source, self.report, self.options.lock_ttl_seconds) as self.lock:
            self._run_locked(plan)
        self.report.seconds = time.monotonic() - started
        return self.report

    def _run_locked(self, plan: Plan) -> None:
        self.report.skipped = dict(plan.skipped)
        self.report.wrong_type = dict(plan.wrong_type)
        # The first connection's failures are diagnosed as they are (a wrong setting should
        # fail fast); once connected, a lost connection is reconnected (see _reconnect).
        sink: AmqpSink | None = self._sink().connect()
        while sink is not None:
            self._set_connected(True)
            if self.metrics is not None:
                self.metrics.set_certificate_expiry(sink.connection.certificate_expiry())
            connected_at = time.monotonic()
            try:
                self._use(sink, plan)
            except Exception as exc:
                # --follow waits out a queue that refuses everything (a quorum queue without
                # a leader) as it waits out a lost node: over a new connection, after a pause.
                unavailable = self.options.follow and errors.queue_unavailable(exc)
                if not errors.connection_lost(exc) and not unavailable:
                    sink.close()
                    raise
                sink.abandon()
                if self._progressed or time.monotonic() - connected_at >= RECONNECT_MAX_PAUSE:
                    self._backoff = None  # a new outage, not the same one going on
                    self._relost = 0
                elif self._backoff is not None:
                    self._relost += 1  # reconnected, and lost again at once: same outage
                sink = self._reconnect(exc)
            else:
                sink.close()
                sink = None
        self.report.remaining = self._remaining(plan)
        if self.options.follow:
            self._pending(plan)

    def _sink(self) -> AmqpSink:
        sink = AmqpSink(
            self.broker,
            blocked_timeout=self.options.blocked_timeout,
            max_message_size=self.options.max_message_size,
            nack_retry_seconds=self.options.nack_retry_seconds,
        )
        sink.etas = self.report.etas
        sink.on_notice = self.notify
        sink.on_redeclare = lambda queue: self.notify(
            f"queue {queue!r} had vanished from RabbitMQ (deleted?): declared it again as the"
            " workers declare it and published its tasks again (none went to quarantine)"
        )
        return sink

    def _use(self, sink: AmqpSink, plan: Plan) -> None:
        """Declare, then move (and follow) over one connection."""
        self._progressed = False
        driver = Driver(
            self.source,
            sink,
            self.report,
            batch_size=self.options.batch_size,
            progress=self.progress,
            check=self._check_lock,
            stop=self.stop.is_set,
            on_batch=self._on_batch,
        )
        for queue_plan in plan.queues:
            sink.prepare(queue_plan.spec)
            self.report.migrated.setdefault(queue_plan.spec.name, 0)
        selected = {q.spec.name: q.spec for q in plan.queues}
        # A bridge stopped while still paused by a Redis consumer has moved nothing.
        if not self.options.follow or self.options.force or self._no_consumers(sink):
            self._move_all(driver, sink, selected, plan)

    # -- a connection lost mid-run ----------------------------------------------------------

    def _reconnect(self, lost: BaseException) -> AmqpSink | None:
        """The connection to RabbitMQ was lost mid-run: nothing unconfirmed was committed, and
        the journal names what was in flight. Adopt it into the possible duplicates (those
        batches are sent again), say so loudly, and reconnect with capped backoff: within
        --reconnect-seconds (one-shot), without limit (--follow, until stopped). The run lock
        stays held meanwhile (its own thread renews it); a lost lock stops the run. The new
        sink, or None if stopped meanwhile; `Diagnosed` once the window is spent."""
        self._set_connected(False)
        self._check_lock()
        adopted = self.source.adopt_crashed_inflight()
        self.report.possible_duplicates = self.source.possible_duplicates()
        window = None if self.options.follow else self.options.reconnect_seconds
        if self._backoff is None:
            self._backoff = Backoff(window)
        backoff = self._backoff
        bound = "until stopped" if window is None else f"for up to {window:g} s"
        what = (
            "PAUSED: a queue at"
            if errors.queue_unavailable(lost)
            else "LOST the connection to RabbitMQ at"
        )
        self.notify(
            f"{what} {self.broker.display_url}: {errors.describe_loss(lost)}. Reconnecting"
            f" {bound}; the {adopted} tasks that were in flight stay in Redis, are sent again"
            " and listed under possible_duplicates"
        )
        last = lost
        tried = False  # every loss gets one attempt, even in a spent window
        while (pause := backoff.next_pause()) is not None or not tried:
            tried = True
            if self.stop.wait(pause or 0.0):
                return None
            self._check_lock()
            sink = self._sink()
            try:
                sink.connect()
            except Exception as exc:
                sink.abandon()
                if not errors.connection_lost(exc):
                    raise
                last = exc
                self.notify(
                    f"reconnect attempt {backoff.attempts} to RabbitMQ failed after"
                    f" {backoff.elapsed:.0f} s: {type(exc).__name__}: {exc}"
                )
                continue
            self.notify(
                f"reconnected to RabbitMQ after {backoff.elapsed:.1f} s (attempt"
                f" {backoff.attempts}): moving on, what was in flight is sent again"
            )
            if self.metrics is not None:
                self.metrics.reconnects.inc()
            return sink
        raise errors.Diagnosed(
            errors.reconnect_failed(
                self.broker.display_url,
                lost,
                last,
                backoff.elapsed,
                backoff.attempts,
                self._relost,
            )
        )

    def _set_connected(self, connected: bool) -> None:
        if self.metrics is not None:
            self.metrics.connected.set(1 if connected else 0)

    def _move_all(
        self,
        driver: Driver[AmqpMessage],
        sink: AmqpSink,
        selected: dict[str, QueueSpec],
        plan: Plan,
    ) -> None:
        # The unacked entries are the plan's, judged once (by fresh_unacked at the start): after
        # a reconnect they are not swept again, an entry a live worker got since is not ours.
        if self.options.include_unacked and plan.unacked_readable and not self._unacked_moved:
            with self.source.unacked_mutex() as mutex:
                self._move_unacked(sink, selected, plan, mutex)
        self._unacked_moved = True
        for queue_plan in plan.queues:
            for key in queue_plan.keys.values():
                driver.move(Lane(key, queue_plan.spec))
        if self.options.follow:
            self._follow(driver, sink, plan)

    # -- --follow -----------------------------------------------------------------------------

    def _follow(self, driver: Driver[AmqpMessage], sink: AmqpSink, plan: Plan) -> None:
        """Round after round until stopped or idle: refuse to race a live Redis consumer
        (pause, loudly), move every lane in kombu's priority order, idle with heartbeats."""
        lanes = [Lane(key, q.spec) for q in plan.queues for key in q.keys.values()]
        active = time.monotonic()  # last time something was pending or moved
        surveyed = time.monotonic()
        while not self.stop.is_set():
            self._check_lock()
            if not self.options.force and not self._no_consumers(sink):
                return
            if time.monotonic() - surveyed >= self.options.resurvey_seconds:
                lanes += self._resurvey(sink, plan)
                surveyed = time.monotonic()
            moved = sum(driver.move(lane) for lane in lanes if not self.stop.is_set())
            pending = self._pending(plan)
            now = time.monotonic()
            if moved or any(pending.values()):
                active = now
            elif self.options.until_idle is not None and now - active >= self.options.until_idle:
                self.notify(f"idle for {self.options.until_idle:g}s: done")
                return
            if not moved and not self.stop.is_set():
                sink.idle(self.options.poll_seconds)

    def _resurvey(self, sink: AmqpSink, plan: Plan) -> list[Lane]:
        """What Redis holds now that the plan did not: queues that appeared since the start (a
        producer release routing to a new queue, a list kombu deleted while it was empty, the
        default queue of a mis-routed producer) join the plan, declared as the rest; unacked
        entries a Redis worker left behind (older than the freshness rule) are moved. The new
        queues' lanes. An explicit --queue selection stays as asked."""
        lanes: list[Lane] = []
        if not self.options.queues:
            fresh = make_plan(self.source, self.queues, self.options)
            plan.bindings, plan.known = fresh.bindings, plan.known | fresh.known
            have = {q.spec.name for q in plan.queues}
            for queue_plan in (q for q in fresh.queues if q.spec.name not in have):
                sink.prepare(queue_plan.spec)
                self.report.migrated.setdefault(queue_plan.spec.name, 0)
                plan.queues.append(queue_plan)
                lanes += [Lane(key, queue_plan.spec) for key in queue_plan.keys.values()]
                self.notify(
                    f"found queue {queue_plan.spec.name!r} in Redis since the start"
                    f" ({queue_plan.total} tasks): declared in RabbitMQ and moved too"
                )
        # Not while any Redis client consumes (--force): its deliveries may be running.
        live = self.source.live_consumers(self.options.recent_consumer_seconds)
        if self.options.include_unacked and plan.unacked_readable and not live:
            self._move_left_unacked(sink, plan)
        return lanes

    def _move_left_unacked(self, sink: AmqpSink, plan: Plan) -> None:
        """Unacked entries that appeared after the start (a Redis worker that came back and
        was killed) and are older than the freshness rule: moved under kombu's mutex."""
        cutoff = time.time() - self.options.fresh_unacked_seconds
        old = [e for e in self.source.unacked() if (e.delivered_at or 0.0) <= cutoff]
        if not old:
            return
        selected = {q.spec.name: q.spec for q in plan.queues}
        with self.source.unacked_mutex() as mutex:
            self._move_unacked(sink, selected, plan, mutex, old)

    def _no_consumers(self, sink: AmqpSink) -> bool:
        """Wait (paused, loudly, heartbeats going) while a client consumes from Redis: moving
        under a live Redis worker would race it. False if stopped meanwhile."""
        paused = False
        while not self.stop.is_set():
            consumers = self.source.live_consumers(self.options.recent_consumer_seconds)
            if not consumers:
                if paused:
                    self.notify("resumed: no client consumes from Redis any more")
                    self._set_paused(False)
                return True
            if not paused:
                self.notify(
                    "PAUSED: a client is consuming from Redis: "
                    + "; ".join(str(c) for c in consumers)
                    + " - stop it (every Celery worker must use RabbitMQ); nothing moves"
                    " until it is gone"
                )
                paused = True
                self._set_paused(True)
            self._check_lock()
            sink.idle(1.0)
        return False

    def _pending(self, plan: Plan) -> dict[str, int]:
        keys = [k for q in plan.queues for k in q.keys.values()]
        lengths = dict(zip(keys, self.source.lengths(keys), strict=True))
        pending = {q.spec.name: sum(lengths[k] for k in q.keys.values()) for q in plan.queues}
        if self.options.include_unacked and plan.unacked_readable and self.source.has_unacked():
            for entry in self.source.unacked():  # a Redis worker's tasks wait there as well
                targets = _entry_targets(entry, plan.bindings, plan.known)
                if targets and all(t in pending for t in targets):  # what this run moves
                    for target in targets:
                        pending[target] += 1
        if self.metrics is not None:
            for queue, count in pending.items():
                self.metrics.set_pending(queue, count)
        self.report.pending = pending
        self.show_pending(pending)
        return pending

    def _set_paused(self, paused: bool) -> None:
        if self.metrics is not None:
            self.metrics.set_paused(paused)

    def _on_batch(self, queue: str, seconds: float) -> None:
        self._progressed = True
        if self.metrics is not None:
            self.metrics.observe_batch(queue, seconds)

    def _remaining(self, plan: Plan) -> dict[str, int]:
        """Read the selected queues again, and survey the whole database for queues that
        appeared meanwhile: completeness is checked, not assumed."""
        keys = [k for q in plan.queues for k in q.keys.values()]
        left = {k: n for k, n in zip(keys, self.source.lengths(keys), strict=True) if n}
        if not self.options.queues:  # every queue was asked for: one that appeared counts
            planned = {q.spec.name for q in plan.queues}
            for late in make_plan(self.source, self.queues, self.options).queues:
                if late.spec.name not in planned:
                    left.update({k: n for s, k in late.keys.items() if (n := late.counts[s])})
        if self.options.include_unacked and plan.unacked_readable:
            selected = {q.spec.name for q in plan.queues}
            for entry in self.source.unacked():
                for target in _entry_targets(entry, plan.bindings, plan.known):
                    if target in selected:
                        where = f"{self.source.layout.unacked} (queue {target})"
                        left[where] = left.get(where, 0) + 1
        return left

    def _decode(self, raw: bytes, spec: QueueSpec) -> AmqpMessage:
        return decode(
            raw,
            queue=spec.name,
            max_priority=spec.max_priority,
            binding=(spec.exchange, spec.routing_key),
            max_size=self.options.max_message_size,
            layout=self.source.layout,
        )

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def _move_unacked(
        self,
        sink: AmqpSink,
        selected: dict[str, QueueSpec],
        plan: Plan,
        mutex: Any,
        entries: Sequence[UnackedEntry] | None = None,
    ) -> None:
        entries = self.source.unacked() if entries is None else entries
        for start in range(0, len(entries), self.options.batch_size):
            self._check_lock()
            mutex.extend(self.source.layout.unacked_mutex_expire, replace_ttl=True)
            batch = entries[start : start + self.options.batch_size]
            self._move_unacked_batch(sink, batch, selected, plan)

    def _move_unacked_batch(
        self,
        sink: AmqpSink,
        entries: Sequence[UnackedEntry],
        selected: dict[str, QueueSpec],
        plan: Plan,
    ) -> None:
        messages: list[AmqpMessage] = []
        owners: list[UnackedEntry] = []  # the unacked entry each message comes from
        moved: list[UnackedEntry] = []
        quarantine: list[UnackedEntry] = []
        per_queue: dict[str, int] = {}
        for entry in entries:
            try:
                decoded = self._unacked_messages(entry, selected, plan)
            except MalformedMessage as exc:
                quarantine.append(entry)
                self.report.quarantine.append(QuarantinedEntry(f"unacked[{entry.tag}]", exc.reason))
                continue
            if not decoded:
                continue  # belongs (also) to a queue that was not selected: left in Redis
            messages.extend(decoded)
            owners.extend([entry] * len(decoded))
            moved.append(entry)
        refused = self._publish(sink, "unacked", messages)
        for refusal in refused:  # a refused copy: the entry stays, quarantined, with the reason
            entry = owners[refusal.index]
            if entry in moved:
                moved.remove(entry)
                quarantine.append(entry)
                self.report.quarantine.append(
                    QuarantinedEntry(f"unacked[{entry.tag}]", refusal.reason)
                )
        refused_at = {refusal.index for refusal in refused}
        ids: dict[str, list[str]] = {}  # per tag, the task ids RabbitMQ confirmed
        for index, message in enumerate(messages):
            if index in refused_at:
                continue
            per_queue[message.routing_key] = per_queue.get(message.routing_key, 0) + 1
            if message.task_id:
                ids.setdefault(owners[index].tag, []).append(message.task_id)
        changed = set(self.source.remove_unacked(moved, quarantine))
        # Published, but the entry changed or went (a worker restored or acked it) since it
        # was read: it may now exist twice.
        doubtful = [i for tag in changed for i in ids.get(tag, [])]
        self.source.add_possible_duplicates(doubtful)
        self.report.possible_duplicates.extend(doubtful)
        self.report.unacked_migrated += len(messages) - len(refused_at)
        for queue, count in per_queue.items():
            self._count(queue, count)

    def _unacked_messages(
        self, entry: UnackedEntry, selected: dict[str, QueueSpec], plan: Plan
    ) -> list[AmqpMessage]:
        """The messages one entry becomes; [] if it is not this run's to move."""
        envelope, exchange, routing_key = split_unacked(entry.value)
        targets = unacked_targets(exchange, routing_key, plan.bindings, plan.known)
        if not targets:
            if self.options.queues:
                return []  # a selection run does not judge entries of other queues
            raise MalformedMessage(
                f"routes nowhere (exchange {exchange!r}, routing key {routing_key!r})"
            )
        if not all(t in selected for t in targets):
            return []
        return [self._decode(envelope, selected[t]) for t in targets]

    def _publish(
        self, sink: AmqpSink, source: str, messages: Sequence[AmqpMessage]
    ) -> list[Rejection]:
        ids = [m.task_id for m in messages if m.task_id]
        self.source.mark_inflight(source, ids)
        return sink.publish(messages) if messages else []

    def _count(self, queue: str, count: int) -> None:
        self._progressed = True
        self.report.migrated[queue] = self.report.migrated.get(queue, 0) + count
        self.progress(queue, count)
