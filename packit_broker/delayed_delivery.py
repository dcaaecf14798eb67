"""Countdown tasks on quorum queues take kombu's native delayed delivery, from workers and movers.

A Celery producer sends a countdown or ETA task for a quorum queue (whose exchange is topic, see
`QueueSpec`) to the exchange `celery_delayed_27` with a routing key that spells the delay in
seconds as 28 binary digits; the message steps down 28 TTL queues (`celery_delayed_27..0`, the
level-n queue holds it 2**n seconds when bit n is set) and reaches the queue through
`celery_delayed_delivery` when it is due, so no worker holds it unacknowledged meanwhile.
A task that `migrate` or the bridge moves keeps its `eta` header; published straight into a
quorum queue it would block a worker's prefetch slot until due, so the movers route it the way
Celery would have. kombu's `native_delayed_delivery` module is the truth about the names and
routing keys; this module only decides when to use it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kombu.transport import native_delayed_delivery as kombu_delayed

from packit_broker.queues import DELAYED_DELIVERY_QUEUE_TYPE, QueueSpec

#: Where a delayed task enters: the highest level, as Celery's `send_task` publishes it.
ENTRY_EXCHANGE = kombu_delayed.level_name(kombu_delayed.MAX_LEVEL)
#: The 28 queues a delayed task waits in, one TTL level each.
LEVEL_QUEUES = tuple(
    kombu_delayed.level_name(level) for level in range(kombu_delayed.MAX_LEVEL + 1)
)
#: The longest delay the 28 levels can spell (about 8.5 years); a later ETA goes straight in.
MAX_DELAY_SECONDS = 2**kombu_delayed.MAX_NUMBER_OF_BITS_TO_USE - 1


#: RabbitMQ's default `consumer_timeout` (30 min): a worker holding a classic queue's ETA task
#: unacknowledged for longer has its channel closed and the task redelivered, over and over.
DEFAULT_CONSUMER_TIMEOUT_SECONDS = 1800.0


@dataclass
class EtaSummary:
    """Tasks not yet due among those published: how many, how far ahead, which would outlast a
    worker's consumer timeout while held (classic queues, where no delayed delivery applies).
    A batch published again after a reconnect is counted again."""

    count: int = 0
    farthest_seconds: float = 0.0
    delayed_delivery: int = 0
    held_past_consumer_timeout: int = 0

    def add(self, spec: QueueSpec, seconds: float, routed: bool) -> None:
        if seconds <= 0:
            return
        self.count += 1
        self.farthest_seconds = max(self.farthest_seconds, seconds)
        self.delayed_delivery += routed
        if not routed and seconds > DEFAULT_CONSUMER_TIMEOUT_SECONDS:
            self.held_past_consumer_timeout += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "farthest_seconds": round(self.farthest_seconds, 1),
            "through_delayed_delivery": self.delayed_delivery,
            "held_past_consumer_timeout": self.held_past_consumer_timeout,
        }


def task_eta(headers: Mapping[str, Any]) -> dt.datetime | None:
    """The `eta` header of a Celery protocol 2 task as an aware datetime (naive: UTC, Celery's
    default `enable_utc`); None when there is none or it is not a timestamp."""
    raw = headers.get("eta")
    if not isinstance(raw, str) or not raw:
        return None
    try:
        eta = dt.datetime.fromisoformat(raw)
    except ValueError:
        return None
    return eta if eta.tzinfo is not None else eta.replace(tzinfo=dt.UTC)


def delay_seconds(headers: Mapping[str, Any], now: dt.datetime) -> float:
    """How far in the future the task is due (0 for an immediate or overdue task)."""
    eta = task_eta(headers)
    return max(0.0, (eta - now).total_seconds()) if eta is not None else 0.0


def delayed_route(
    spec: QueueSpec, headers: Mapping[str, Any], now: dt.datetime
) -> tuple[str, str] | None:
    """(exchange, routing key) that delivers the task to `spec` when due; None: publish directly.

    Whole seconds, rounded down as Celery does: the task may arrive up to a second early and
    the worker holds it for that rest (its `eta` header is kept), so it never runs early.
    """
    if not spec.delayed_delivery:
        return None
    seconds = int(delay_seconds(headers, now))
    if seconds < 1 or seconds > MAX_DELAY_SECONDS:
        return None
    return ENTRY_EXCHANGE, kombu_delayed.calculate_routing_key(seconds, spec.routing_key)


def declare(connection: Any, spec: QueueSpec) -> None:
    """Declare the delayed-delivery queues and bind `spec` to them, as a Celery worker does at
    start (`celery.worker.consumer.delayed_delivery`); without the binding a delayed task that
    comes due is dropped by RabbitMQ as unroutable. `connection` is a py-amqp connection."""
    if not spec.delayed_delivery:
        return
    channels: Any = _Channels(connection)  # kombu types it Connection; it only calls .channel()
    try:
        kombu_delayed.declare_native_delayed_delivery_exchanges_and_queues(
            channels, DELAYED_DELIVERY_QUEUE_TYPE
        )
        kombu_delayed.bind_queue_to_native_delayed_delivery_exchange(channels, spec.kombu_queue())
    finally:
        channels.close()


class _Channels:
    """The `.channel()` kombu's functions call, on a py-amqp connection (kombu's channel class
    on it); closes what it opened (kombu's functions leave each channel open)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.opened: list[Any] = []

    def channel(self) -> Any:
        # kombu's own py-amqp channel class: its entities call `prepare_queue_arguments`.
        from kombu.transport.pyamqp import Channel

        channel = Channel(self.connection)
        channel.open()
        self.opened.append(channel)
        return channel

    def close(self) -> None:
        for channel in self.opened:
            if getattr(channel, "is_open", False):
                channel.close()
