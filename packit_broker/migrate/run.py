"""The migration: plan, refuse if Redis is still consumed or laid out otherwise, move, verify.

Order: the `unacked` entries first (a killed worker's and countdown tasks, ahead of their
queue's backlog, as kombu would have restored them), then per queue the priority buckets in
kombu's order, oldest first - the order Redis workers would have taken them. Afterwards the
selected queues are read again: whatever is still there is reported, not assumed away.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from packit_broker.config import BrokerEndpoint
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
    Rejection,
    Ticket,
)
from packit_broker.migrate.redis_source import (
    LiveConsumer,
    RedisSource,
    RunLock,
    Survey,
    UnackedEntry,
)
from packit_broker.queues import QueueSettings, QueueSpec

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size
Progress = Callable[[str, int], None]
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
            "skipped": _skipped(self.skipped),
            "wrong_type": _wrong_type(self.wrong_type),
            "layout": self.layout.as_options(),
            "layout_problems": list(self.layout_problems),
        }


@dataclass
class QuarantinedEntry:
    source: str
    reason: str


@dataclass
class Report:
    migrated: dict[str, int] = field(default_factory=dict)
    unacked_migrated: int = 0
    quarantine: list[QuarantinedEntry] = field(default_factory=list)
    possible_duplicates: list[str] = field(default_factory=list)
    adopted_duplicates: int = 0  # how many of them were in Redis's list when the run began
    skipped: dict[str, str] = field(default_factory=dict)
    wrong_type: dict[str, str] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)  # where -> entries left behind
    taken_over_from: str | None = None
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.migrated.values())

    @property
    def complete(self) -> bool:
        return not self.remaining and not self.wrong_type

    def as_dict(self) -> dict[str, Any]:
        return {
            "migrated": dict(self.migrated),
            "unacked_migrated": self.unacked_migrated,
            "quarantined": len(self.quarantine),
            "quarantine": [{"source": q.source, "reason": q.reason} for q in self.quarantine],
            "possible_duplicates": list(self.possible_duplicates),
            "skipped": _skipped(self.skipped),
            "wrong_type": _wrong_type(self.wrong_type),
            "remaining": dict(self.remaining),
            "complete": self.complete,
            "taken_over_from": self.taken_over_from,
            "seconds": round(self.seconds, 3),
        }


def _skipped(skipped: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": name, "reason": why} for name, why in sorted(skipped.items())]


def _wrong_type(wrong: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "type": kind} for key, kind in sorted(wrong.items())]


@dataclass
class _Decoded:
    """One batch as read from Redis and what became of each entry."""

    entries: Sequence[bytes]
    messages: list[AmqpMessage] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # entry index of each message
    quarantine: list[int] = field(default_factory=list)  # indexes into `entries`
    reasons: list[str] = field(default_factory=list)
    refused: list[Rejection] = field(default_factory=list)


def _task_ids(batches: Iterable[_Decoded]) -> list[str]:
    return [m.task_id for batch in batches for m in batch.messages if m.task_id]


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
    ) -> None:
        self.source = source
        self.broker = broker
        self.queues = queues
        self.options = options
        self.progress = progress or (lambda queue, n: None)
        self.report = Report()
        self.lock: RunLock | None = None

    def run(self, plan: Plan) -> Report:
        """Refusals first (nothing touched), then the run lock, then the moves."""
        started = time.monotonic()
        if plan.layout_refusal:
            raise Refused(plan.layout_refusal)
        if plan.refusal and not self.options.force:
            raise Refused(plan.refusal)
        self.lock = RunLock(self.source, self.options.lock_ttl_seconds)
        try:
            self.report.taken_over_from = self.lock.acquire()
            self.lock.start()
            self._run_locked(plan)
        finally:
            self.lock.release()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _run_locked(self, plan: Plan) -> None:
        self.source.adopt_crashed_inflight()
        self.report.possible_duplicates = self.source.possible_duplicates()
        self.report.adopted_duplicates = len(self.report.possible_duplicates)
        self.report.skipped = dict(plan.skipped)
        self.report.wrong_type = dict(plan.wrong_type)
        with AmqpSink(
            self.broker,
            blocked_timeout=self.options.blocked_timeout,
            nack_retry_seconds=self.options.nack_retry_seconds,
        ) as sink:
            for queue_plan in plan.queues:
                sink.declare(queue_plan.spec)
                self.report.migrated.setdefault(queue_plan.spec.name, 0)
            selected = {q.spec.name: q.spec for q in plan.queues}
            if self.options.include_unacked and plan.unacked_readable:
                with self.source.unacked_mutex() as mutex:
                    self._move_unacked(sink, selected, plan, mutex)
            for queue_plan in plan.queues:
                for key in queue_plan.keys.values():
                    self._move_list(sink, queue_plan.spec, key)
        self.report.remaining = self._remaining(plan)

    def _remaining(self, plan: Plan) -> dict[str, int]:
        """Read the selected queues again: completeness is checked, not assumed."""
        keys = [k for q in plan.queues for k in q.keys.values()]
        left = {k: n for k, n in zip(keys, self.source.lengths(keys), strict=True) if n}
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

    def _decode_batch(self, batch: Sequence[bytes], spec: QueueSpec) -> _Decoded:
        decoded = _Decoded(batch)
        for index, raw in enumerate(batch):
            try:
                decoded.messages.append(self._decode(raw, spec))
                decoded.positions.append(index)
            except MalformedMessage as exc:
                decoded.quarantine.append(index)
                decoded.reasons.append(exc.reason)
        return decoded

    @staticmethod
    def _refused(batch: _Decoded, refused: Sequence[Rejection]) -> None:
        """Messages RabbitMQ refused are quarantined with its reason; the rest is committed."""
        batch.refused = list(refused)
        for refusal in refused:
            batch.quarantine.append(batch.positions[refusal.index])
            batch.reasons.append(refusal.reason)

    def _move_list(self, sink: AmqpSink, spec: QueueSpec, key: str) -> None:
        """Two half batches in flight: the next is read, decoded and published while RabbitMQ
        confirms the previous one; only a fully settled batch at the tail is removed. At most
        `batch_size` messages are unconfirmed at any time (the confirm window, and so the most
        a crash can duplicate). Late arrivals at the producing end are read once the tail is
        drained.

        The in-flight marker always names every batch that is sent but not yet removed (it is
        rewritten before each send and after each removal), so a crash at any instant leaves
        every possible duplicate listed. The run lock is checked before every send.
        """
        depth = 2 if self.options.batch_size >= 2 else 1  # batches in flight
        size = self.options.batch_size // depth  # so at most batch_size are unconfirmed
        inflight: collections.deque[tuple[_Decoded, Ticket]] = collections.deque()
        skip = 0  # entries sent and not yet removed, counted from the tail
        while True:
            batch = self._decode_batch(self.source.following(key, skip, size), spec)
            if batch.entries:
                self._check_lock()
                inflight.append((batch, Ticket(0, 0)))
                self.source.mark_inflight(key, _task_ids(b for b, _ in inflight))
                inflight[-1] = (batch, sink.send(batch.messages))
                skip += len(batch.entries)
            if not inflight:
                return
            if len(inflight) < depth and batch.entries:
                continue
            done, ticket = inflight.popleft()
            self._refused(done, sink.wait(ticket))
            # The Lua script re-checks that `done` is still the tail before removing it; the
            # marker is kept (it still names the batch in flight) and rewritten right after.
            self.source.remove_confirmed(
                key, done.entries, done.quarantine, keep_marker=bool(inflight)
            )
            skip -= len(done.entries)
            if inflight:
                self.source.mark_inflight(key, _task_ids(b for b, _ in inflight))
            self.report.quarantine.extend(QuarantinedEntry(key, r) for r in done.reasons)
            self._count(spec.name, len(done.messages) - len(done.refused))

    def _check_lock(self) -> None:
        if self.lock is not None:
            self.lock.check()

    def _move_unacked(
        self, sink: AmqpSink, selected: dict[str, QueueSpec], plan: Plan, mutex: Any
    ) -> None:
        entries = self.source.unacked()
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
        self.report.migrated[queue] = self.report.migrated.get(queue, 0) + count
        self.progress(queue, count)
