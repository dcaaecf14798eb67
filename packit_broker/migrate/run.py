"""The migration: plan, refuse if Redis is still being consumed, move, report.

Order: the `unacked` entries first (a killed worker's and countdown tasks, ahead of their
queue's backlog, as kombu would have restored them), then per queue the priority buckets
0, 3, 6, 9, oldest first - the order Redis workers would have taken them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from packit_broker.config import BrokerEndpoint
from packit_broker.envelope import (
    PRIORITY_STEPS,
    AmqpMessage,
    MalformedMessage,
    decode,
    split_unacked,
)
from packit_broker.migrate.amqp_sink import DEFAULT_BLOCKED_TIMEOUT, AmqpSink, Rejection, Ticket
from packit_broker.migrate.redis_source import (
    LiveConsumer,
    RedisSource,
    UnackedEntry,
)
from packit_broker.queues import QueueSettings, QueueSpec

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size
Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class MigrateOptions:
    queues: tuple[str, ...] = ()  # explicit selection; empty: configured + found in Redis
    batch_size: int = 1000
    include_unacked: bool = True
    force: bool = False
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    fresh_unacked_seconds: float = 300.0
    blocked_timeout: float = DEFAULT_BLOCKED_TIMEOUT  # how long a RabbitMQ alarm is waited out


@dataclass
class QueuePlan:
    spec: QueueSpec
    origin: str  # configured | redis | binding | requested
    counts: dict[int, int]
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
    bindings: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # kombu's, per queue

    @property
    def refusal(self) -> str | None:
        reasons = [f"a client is consuming from Redis: {c}" for c in self.live_consumers]
        if self.fresh_unacked:
            reasons.append(
                f"{self.fresh_unacked} unacked entries were delivered in the last minutes"
                " (a worker may still be running them)"
            )
        return "; ".join(reasons) or None

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
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.migrated.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "migrated": dict(self.migrated),
            "unacked_migrated": self.unacked_migrated,
            "quarantined": len(self.quarantine),
            "quarantine": [{"source": q.source, "reason": q.reason} for q in self.quarantine],
            "possible_duplicates": list(self.possible_duplicates),
            "seconds": round(self.seconds, 3),
        }


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
    """Redis is still being consumed; migrating now could lose or double tasks."""


# -- planning ---------------------------------------------------------------------------------


def _unacked_targets(
    exchange: str, routing_key: str, bindings: dict[str, set[tuple[str, str]]], known: set[str]
) -> list[str]:
    """Where kombu would have restored an unacked entry: its binding, else its routing key."""
    bound = sorted(q for q, pairs in bindings.items() if (exchange, routing_key) in pairs)
    if bound:
        return bound
    return [routing_key] if routing_key in known else []


def make_plan(source: RedisSource, queues: QueueSettings, options: MigrateOptions) -> Plan:
    bindings = source.bound_queues()
    origins: dict[str, str] = {}
    if options.queues:
        origins = dict.fromkeys(options.queues, "requested")
    else:
        origins = dict.fromkeys(queues.names, "configured")
        for name in sorted(source.list_queues()):
            origins.setdefault(name, "redis")
        for name in sorted(bindings):
            origins.setdefault(name, "binding")
    plans = {
        name: QueuePlan(
            queues.spec(name), origin, {s: source.length(name, s) for s in PRIORITY_STEPS}
        )
        for name, origin in origins.items()
    }
    unacked_total = 0
    if options.include_unacked:
        for entry in source.unacked():
            try:
                _, exchange, routing_key = split_unacked(entry.value)
            except MalformedMessage:
                continue
            for target in _unacked_targets(exchange, routing_key, bindings, set(plans)):
                if target in plans:
                    plans[target].unacked += 1
                    unacked_total += 1
    fresh = source.fresh_unacked(options.fresh_unacked_seconds) if options.include_unacked else 0
    return Plan(list(plans.values()), unacked_total, source.live_consumers(), fresh, bindings)


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

    def run(self, plan: Plan) -> Report:
        started = time.monotonic()
        if plan.refusal and not self.options.force:
            raise Refused(plan.refusal)
        self.source.adopt_crashed_inflight()
        self.report.possible_duplicates = self.source.possible_duplicates()
        with AmqpSink(self.broker, blocked_timeout=self.options.blocked_timeout) as sink:
            for queue_plan in plan.queues:
                sink.declare(queue_plan.spec)
                self.report.migrated.setdefault(queue_plan.spec.name, 0)
            selected = {q.spec.name: q.spec for q in plan.queues}
            if self.options.include_unacked:
                self._move_unacked(sink, selected, plan.bindings)
            for queue_plan in plan.queues:
                for step in PRIORITY_STEPS:
                    self._move_list(sink, queue_plan.spec, step)
        self.source.clear_possible_duplicates()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _decode(self, raw: bytes, spec: QueueSpec) -> AmqpMessage:
        return decode(
            raw,
            queue=spec.name,
            max_priority=spec.max_priority,
            binding=(spec.exchange, spec.routing_key),
            max_size=self.options.max_message_size,
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

    def _move_list(self, sink: AmqpSink, spec: QueueSpec, step: int) -> None:
        """Two half batches in flight: the next is read, decoded and published while RabbitMQ
        confirms the previous one; only a fully settled batch at the tail is removed. At most
        `batch_size` messages are unconfirmed at any time (the confirm window, and so the most
        a crash can duplicate).

        The in-flight marker always names every batch that is sent but not yet removed (it is
        rewritten before each send and after each removal), so a crash at any instant leaves
        every possible duplicate listed.
        """
        key = self.source.keys.queue(spec.name, step)
        depth = 2 if self.options.batch_size >= 2 else 1  # batches in flight
        size = self.options.batch_size // depth  # so at most batch_size are unconfirmed
        inflight: collections.deque[tuple[_Decoded, Ticket]] = collections.deque()
        skip = 0  # entries sent and not yet removed, counted from the tail
        while True:
            batch = self._decode_batch(self.source.following(spec.name, step, skip, size), spec)
            if batch.entries:
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
                spec.name, step, done.entries, done.quarantine, keep_marker=bool(inflight)
            )
            skip -= len(done.entries)
            if inflight:
                self.source.mark_inflight(key, _task_ids(b for b, _ in inflight))
            self.report.quarantine.extend(QuarantinedEntry(key, r) for r in done.reasons)
            self._count(spec.name, len(done.messages) - len(done.refused))

    def _move_unacked(
        self,
        sink: AmqpSink,
        selected: dict[str, QueueSpec],
        bindings: dict[str, set[tuple[str, str]]],
    ) -> None:
        entries = self.source.unacked()
        for start in range(0, len(entries), self.options.batch_size):
            self._move_unacked_batch(
                sink, entries[start : start + self.options.batch_size], selected, bindings
            )

    def _move_unacked_batch(
        self,
        sink: AmqpSink,
        entries: Sequence[UnackedEntry],
        selected: dict[str, QueueSpec],
        bindings: dict[str, set[tuple[str, str]]],
    ) -> None:
        messages: list[AmqpMessage] = []
        owners: list[str] = []  # the unacked tag each message comes from
        confirmed: list[str] = []
        quarantine: list[str] = []
        per_queue: dict[str, int] = {}
        for entry in entries:
            source = f"unacked[{entry.tag}]"
            try:
                envelope, exchange, routing_key = split_unacked(entry.value)
                targets = _unacked_targets(exchange, routing_key, bindings, set(selected))
                if not targets:
                    raise MalformedMessage(
                        f"routes nowhere (exchange {exchange!r}, routing key {routing_key!r})"
                    )
                decoded = [self._decode(envelope, selected[t]) for t in targets if t in selected]
            except MalformedMessage as exc:
                quarantine.append(entry.tag)
                self.report.quarantine.append(QuarantinedEntry(source, exc.reason))
                continue
            if not decoded:
                continue  # belongs to a queue that was not selected: left in Redis
            messages.extend(decoded)
            owners.extend([entry.tag] * len(decoded))
            confirmed.append(entry.tag)
        refused = self._publish(sink, "unacked", messages)
        for refusal in refused:  # a refused copy: the entry stays, quarantined, with the reason
            tag = owners[refusal.index]
            if tag in confirmed:
                confirmed.remove(tag)
                quarantine.append(tag)
                self.report.quarantine.append(QuarantinedEntry(f"unacked[{tag}]", refusal.reason))
        self.source.remove_unacked(confirmed, quarantine)
        refused_at = {refusal.index for refusal in refused}
        for index, message in enumerate(messages):
            if index not in refused_at:
                per_queue[message.routing_key] = per_queue.get(message.routing_key, 0) + 1
        self.report.unacked_migrated += len(messages) - len(refused_at)
        for queue, count in per_queue.items():
            self._count(queue, count)

    def _publish(
        self, sink: AmqpSink, source: str, messages: Sequence[AmqpMessage]
    ) -> list[Rejection]:
        ids = [m.task_id for m in messages if m.task_id]
        self.source.mark_inflight(source, ids)
        return sink.publish(messages) if messages else []

    def _count(self, queue: str, count: int) -> None:
        self.report.migrated[queue] = self.report.migrated.get(queue, 0) + count
        self.progress(queue, count)
