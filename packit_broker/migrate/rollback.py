"""The rollback: RabbitMQ -> Redis, on the same driver, journal and lock as the forward run.

Each batch is consumed from RabbitMQ with manual acks, written into kombu's Redis layout in
one MULTI/EXEC together with the in-flight journal, and acknowledged only then. The run lock
and the journal live in Redis (here the destination), under the same keys as the forward
run's: a forward bridge and a rollback never run against one Redis at once, and a crash of
either is adopted by the next run of either, its ids reported as possible duplicates.

Queues: the configured ones (PACKIT_BROKER_QUEUES; one that does not exist in RabbitMQ is
skipped and named), or exactly those given with --queue (one that does not exist refuses).
A queue another client consumes refuses the run (unless --force); --follow pauses instead.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from packit_broker.config import BrokerEndpoint
from packit_broker.migrate.amqp_source import AmqpSource
from packit_broker.migrate.driver import Driver, Progress
from packit_broker.migrate.metrics import FollowMetrics
from packit_broker.migrate.protocols import Lane
from packit_broker.migrate.redis_sink import Journal, RedisEntry, RedisSink, durability
from packit_broker.migrate.redis_source import RedisSource, RunLock, locked_run
from packit_broker.migrate.report import REDELIVERED, Report, skipped_list
from packit_broker.migrate.run import Refused
from packit_broker.queues import QueueSettings, QueueSpec

SWEEPS = 3  # passes over lanes that still hold something at the end of a one-shot run


@dataclass(frozen=True)
class RollbackOptions:
    queues: tuple[str, ...] = ()  # exactly these; empty: the configured ones
    batch_size: int = 1000  # = the consumer prefetch and the most a crash can duplicate
    force: bool = False
    lock_ttl_seconds: float = 30.0
    follow: bool = False
    until_idle: float | None = None
    poll_seconds: float = 0.1


@dataclass(frozen=True)
class RollbackQueue:
    spec: QueueSpec
    origin: str  # configured | requested
    ready: int
    consumers: int


@dataclass
class RollbackPlan:
    queues: list[RollbackQueue]
    skipped: dict[str, str] = field(default_factory=dict)  # configured, absent: name -> why
    missing: list[str] = field(default_factory=list)  # requested with --queue, absent
    #: queue -> RabbitMQ's refusal of the workers' declaration (other arguments: most often
    #: an x-max-priority that PACKIT_BROKER_MAX_PRIORITY does not give)
    declared_differently: dict[str, str] = field(default_factory=dict)
    #: the destination Redis holds another layout than configured (not overridable: tasks
    #: would be written where no worker reads, or partly refused by WRONGTYPE)
    layout_problems: list[str] = field(default_factory=list)

    @property
    def layout_refusal(self) -> str | None:
        return "; ".join(self.layout_problems) or None

    @property
    def refusal(self) -> str | None:
        """Why RabbitMQ looks still consumed (`--force` overrides)."""
        busy = [
            f"{q.spec.name!r} has {q.consumers} consumer(s)" for q in self.queues if q.consumers
        ]
        if not busy:
            return None
        return "a client is consuming from RabbitMQ: " + "; ".join(busy)

    @property
    def selection_refusal(self) -> str | None:
        reasons = []
        if self.missing:
            names = ", ".join(repr(name) for name in self.missing)
            reasons.append(
                f"--queue {names} does not exist in RabbitMQ: check the spelling (and the vhost"
                " in the URL)"
            )
        for name, why in sorted(self.declared_differently.items()):
            reasons.append(
                f"{name!r} exists in RabbitMQ with other arguments than the workers' declaration"
                f" ({why}): set PACKIT_BROKER_MAX_PRIORITY (and PACKIT_BROKER_QUEUE_TYPE) as the"
                " workers have them - without the queue's x-max-priority every task would land"
                " in one Redis priority bucket"
            )
        return "; ".join(reasons) or None

    def as_dict(self) -> dict[str, Any]:
        return {
            "direction": "rollback",
            "queues": [
                {
                    "name": q.spec.name,
                    "origin": q.origin,
                    "messages": q.ready,
                    "consumers": q.consumers,
                    "max_priority": q.spec.max_priority,
                }
                for q in self.queues
            ],
            "skipped": skipped_list(self.skipped),
            "missing": list(self.missing),
            "layout_problems": list(self.layout_problems),
        }


#: `remaining` key for tasks still in kombu's delayed-delivery queues (quorum countdowns): a
#: rollback reads the worker queues, which they reach only when due.
COUNTING_DOWN = "celery_delayed_* (countdown tasks not yet due; rerun after the farthest ETA)"


@dataclass
class RollbackReport(Report):
    """The forward report plus the quarantined messages, each whole: they stay in RabbitMQ
    (never acknowledged), the report shows their bytes so nothing depends on finding them."""

    left_in_rabbitmq: list[dict[str, Any]] = field(default_factory=list)
    redis_durability: str = "unknown"  # see packit_broker.migrate.redis_sink.Durability
    #: ids RabbitMQ marked redelivered: a consumer had them before (a worker that stopped,
    #: perhaps mid-task; an earlier run that stopped or lost an ack with a node; a node restart)
    redelivered: list[str] = field(default_factory=list)

    def evidence(self) -> dict[str, list[str]]:
        return {**super().evidence(), REDELIVERED: self.redelivered}

    def as_dict(self) -> dict[str, Any]:
        return {
            "direction": "rollback",
            **super().as_dict(),
            "redelivered": list(dict.fromkeys(self.redelivered)),
            "left_in_rabbitmq": self.left_in_rabbitmq,
            "redis_durability": self.redis_durability,
        }


class Rollback:
    """One rollback run: plan (read-only), then refusals, the lock, the moves, the report."""

    def __init__(
        self,
        broker: BrokerEndpoint,
        store: RedisSource,
        queues: QueueSettings,
        options: RollbackOptions,
        progress: Progress | None = None,
        *,
        stop: threading.Event | None = None,
        notify: Callable[[str], None] | None = None,
        metrics: FollowMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.queues = queues
        self.options = options
        self.progress = progress or (lambda queue, n: None)
        self.stop = stop or threading.Event()
        self.notify = notify or (lambda text: None)
        self.journal = Journal(store)
        self.source = AmqpSource(
            broker,
            store.layout,
            window=options.batch_size,
            mark=self.journal.mark,
            committed=lambda keep: self.journal.committed(keep=keep),
            doubt=self.journal.doubt,
        )
        self.report = RollbackReport()
        self.lock: RunLock | None = None

    def __enter__(self) -> Rollback:
        self.source.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.source.close()

    def plan(self) -> RollbackPlan:
        """Read-only: which queues exist, how many messages are ready, who consumes them."""
        requested = bool(self.options.queues)
        names = self.options.queues or self.queues.names
        plan = RollbackPlan(queues=[])
        for name in names:
            state = self.source.state(name)
            if state is None:
                if requested:
                    plan.missing.append(name)
                else:
                    plan.skipped[name] = "configured, but no such queue in RabbitMQ"
                continue
            origin = "requested" if requested else "configured"
            spec = self.queues.spec(name)
            if (why := self.source.declared_differently(spec)) is not None:
                plan.declared_differently[name] = why
            plan.queues.append(RollbackQueue(spec, origin, state.ready, state.consumers))
        return plan

    def check_destination(self, plan: RollbackPlan) -> None:
        """Read-only, on Redis: does it hold the layout the run will write? Keys of another
        separator or prefix (the transport options forgotten or wrong) or a target key of
        another type go into `plan.layout_problems`."""
        survey = self.store.survey()
        problems = list(survey.mismatches)
        layout = self.store.layout
        if survey.foreign_prefixes:
            shown = ", ".join(repr(p) for p in sorted(survey.foreign_prefixes))
            problems.append(
                f"Redis holds kombu keys under global_keyprefix {shown}, not"
                f" {layout.global_keyprefix!r}: set global_keyprefix as the Redis app does"
            )
        keys = [k for q in plan.queues for k in layout.bucket_keys(q.spec.name).values()]
        for key, kind in sorted(self.store.types(keys).items()):
            if kind not in ("list", "none"):
                problems.append(f"{key!r} is a Redis {kind}, not a list: kombu could not read it")
        plan.layout_problems = problems

    def run(self, plan: RollbackPlan) -> RollbackReport:
        """Refusals first (nothing touched), then the run lock (in Redis), then the moves."""
        started = time.monotonic()
        if plan.layout_refusal:
            raise Refused(plan.layout_refusal)
        if plan.selection_refusal:
            raise Refused(plan.selection_refusal)
        if plan.refusal and not self.options.force and not self.options.follow:
            raise Refused(plan.refusal)
        with locked_run(self.store, self.report, self.options.lock_ttl_seconds) as self.lock:
            self.report.redelivered = self.store.listed(REDELIVERED)  # a crashed run's
            try:
                self._run_locked(plan)
            finally:  # in Redis's list after those, in the same order
                self.report.redelivered.extend(self.journal.listed)
        self.report.seconds = time.monotonic() - started
        return self.report

    def _run_locked(self, plan: RollbackPlan) -> None:
        self.report.skipped = dict(plan.skipped)
        persistence = durability(self.store)
        self.report.redis_durability = persistence.level
        if persistence.warning:
            self.notify(f"WARNING: {persistence.warning}")
        sink = RedisSink(self.store, self.journal)
        progress, on_batch = self.progress, None
        if self.metrics is not None:
            self.metrics.watch(self.report)
            self.metrics.connected.set(1)
            self.metrics.set_certificate_expiry(self.source.connection.certificate_expiry())
            progress = self.metrics.counting(progress)
            on_batch = self.metrics.observe_batch
        driver: Driver[RedisEntry] = Driver(
            self.source,
            sink,
            self.report,
            batch_size=self.options.batch_size,
            # The AMQP source hands each delivery out once: a batch cut by bytes would leave
            # the cut deliveries unwritten and unacked. Its prefetch bounds it by count.
            batch_bytes=sys.maxsize,
            progress=progress,
            check=self._check_lock,
            stop=self.stop.is_set,
            on_batch=on_batch,
        )
        for queue in plan.queues:
            sink.prepare(queue.spec)
            self.report.migrated.setdefault(queue.spec.name, 0)
        lanes = [Lane(q.spec.name, q.spec) for q in plan.queues]
        if not self.options.follow or self.options.force or self._no_consumers(lanes):
            self._sweep(driver, lanes)
            if self.options.follow:
                self._follow(driver, lanes)
        self.report.remaining = {
            lane.key: left for lane in lanes if (left := self.source.leftover(lane.key))
        }
        if any(q.spec.delayed_delivery for q in plan.queues) and (
            waiting := self.source.counting_down()
        ):
            # Only quorum queues receive delayed deliveries. Which of them a waiting task is for
            # cannot be read without consuming it; counted whole, on the safe side.
            self.report.remaining[COUNTING_DOWN] = waiting
        self.report.left_in_rabbitmq = [held.as_dict() for held in self.source.held]

    def _sweep(self, driver: Driver[RedisEntry], lanes: list[Lane]) -> None:
        """Move every lane; then again the lanes that still hold something (a delivery that
        reached us after its queue looked empty: a loaded broker or network can be slower than
        the settle time), a few passes at most (a one-shot run does not chase producers)."""
        todo = lanes
        for _ in range(SWEEPS):
            if not todo or self.stop.is_set():
                return
            if not sum(driver.move(lane) for lane in todo):
                return
            todo = [lane for lane in todo if self.source.leftover(lane.key)]

    def _follow(self, driver: Driver[RedisEntry], lanes: list[Lane]) -> None:
        """Round after round until stopped or idle; pause (loudly) while another client
        consumes a selected queue: moving under a live RabbitMQ worker would race it."""
        active = time.monotonic()
        while not self.stop.is_set():
            self._check_lock()
            if not self.options.force and not self._no_consumers(lanes):
                return
            moved = sum(driver.move(lane) for lane in lanes if not self.stop.is_set())
            self._show_pending(lanes)
            now = time.monotonic()
            if moved:
                active = now
            elif self.options.until_idle is not None and now - active >= self.options.until_idle:
                self.notify(f"idle for {self.options.until_idle:g}s: done")
                return
            if not moved and not self.stop.is_set():
                self.source.idle(self.options.poll_seconds)

    def _no_consumers(self, lanes: list[Lane]) -> bool:
        """Wait while another client consumes a selected queue; False if stopped meanwhile."""
        paused = False
        names = [lane.key for lane in lanes]
        while not self.stop.is_set():
            busy = self.source.others_consuming(names)
            if not busy:
                if paused:
                    self.notify("resumed: no other client consumes the RabbitMQ queues")
                    if self.metrics is not None:
                        self.metrics.set_paused(False)
                return True
            if not paused:
                if self.metrics is not None:
                    self.metrics.set_paused(True)
                shown = "; ".join(f"{q!r}: {n} consumer(s)" for q, n in sorted(busy.items()))
                self.notify(
                    f"PAUSED: a client is consuming from RabbitMQ ({shown}) - stop it (every"
                    " Celery worker must use Redis again); nothing moves until it is gone"
                )
                paused = True
            self._check_lock()
            self._show_pending(lanes)
            self.source.idle(1.0)
        return False

    # -- metrics (with --follow --metrics-port) ---------------------------------------------

    def _show_pending(self, lanes: list[Lane]) -> None:
        if self.metrics is not None:  # a passive declare per queue: only when watched
            for lane in lanes:
                self.metrics.set_pending(lane.key, self.source.leftover(lane.key))

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()
