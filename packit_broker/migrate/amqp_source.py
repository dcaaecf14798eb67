"""I/O: consuming RabbitMQ queues with manual acks, acknowledging only what the sink accepted.

One channel and consumer per queue (lane), deliveries read into a buffer by `read()`. The
prefetch is the driver's window (what is written to Redis and not yet acknowledged: the most
a crash can duplicate) plus as much read-ahead, so RabbitMQ keeps sending while a batch is
written and acknowledged (measured here: 6,895 vs 5,952 msg/s, medians of 3 alternating
rounds of 20,000, against a prefetch of one window).
`commit()` acknowledges exactly the committed deliveries (one multiple-ack when they are the
channel's oldest unacknowledged ones and none is held back),
then waits for a synchronous reply on the same channel, so RabbitMQ has processed the acks
before the journal forgets the batch. Deliveries the driver quarantined are never
acknowledged: they stay unacknowledged on our channel (RabbitMQ requeues them, byte-exact,
when it closes), so they are not delivered to us again and the run does not loop over them;
each is reported with its body. A queue is empty when nothing beyond what was handed out is
buffered, RabbitMQ reports no ready message, and no delivery arrives within a short drain
(a delivery may leave the queue before the count is read and reach us after it).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import amqp

from packit_broker import delayed_delivery
from packit_broker.amqp_client import open_connection
from packit_broker.codecs import from_amqp
from packit_broker.config import BrokerEndpoint
from packit_broker.kombu_layout import KombuLayout
from packit_broker.messages import MalformedMessage, TaskMessage
from packit_broker.migrate.protocols import Lane
from packit_broker.queues import QueueSpec

QUIET = 0.05  # s without a delivery before RabbitMQ is asked how many are ready
SETTLE = 0.2  # s a queue reported empty must stay quiet (deliveries still on the wire)
#: s with messages ready but none delivered to us (a single-active-consumer queue consumed by
#: another client under --force): the lane ends, what is left is reported, never a hang
STALL = 10.0
CONSUMER_TAG = "packit-broker-rollback"


class Delivery(bytes):
    """One consumed message: its body bytes (the raw entry the driver handles), plus what
    RabbitMQ delivered with it."""

    tag: int
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    redelivered: bool

    @classmethod
    def of(cls, message: Any) -> Delivery:
        body = message.body
        if body == "":  # py-amqp leaves a bodyless message's default: an empty str
            body = b""
        if isinstance(body, str):  # only if py-amqp's auto_decode was on: never here
            raise TypeError("channel decoded a body; auto_decode must be off")
        delivery = cls(body)
        info = message.delivery_info
        delivery.tag = int(info["delivery_tag"])
        delivery.properties = dict(message.properties)
        delivery.exchange = str(info.get("exchange") or "")
        delivery.routing_key = str(info.get("routing_key") or "")
        delivery.redelivered = bool(info.get("redelivered"))
        return delivery

    @property
    def task_id(self) -> str | None:
        return _text(self.properties.get("application_headers"), "id")

    def describe(self) -> str:
        return f"delivery {self.tag}, {len(self)} bytes, body sha1 {hashlib.sha1(self).hexdigest()}"


@dataclass(frozen=True)
class QueueState:
    """A queue as RabbitMQ reports it: ready messages and consumers (None: does not exist)."""

    name: str
    ready: int
    consumers: int


@dataclass(frozen=True)
class HeldMessage:
    """A quarantined delivery, left unacknowledged (RabbitMQ keeps it) and reported whole."""

    queue: str
    delivery: Delivery

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "task_id": self.delivery.task_id,
            "delivery": self.delivery.describe(),
            "body_base64": base64.b64encode(self.delivery).decode("ascii"),
            "properties": _json_safe(self.delivery.properties),
            "exchange": self.delivery.exchange,
            "routing_key": self.delivery.routing_key,
        }


@dataclass
class _Consuming:
    """One lane's channel, consumers and deliveries."""

    queue: str
    channel: Any
    tags: list[str] = field(default_factory=list)  # our consumer tags on this queue
    buffer: collections.deque[Delivery] = field(default_factory=collections.deque)
    #: every delivery not acknowledged on this channel, in delivery-tag order
    unacked: collections.OrderedDict[int, None] = field(default_factory=collections.OrderedDict)
    held: int = 0
    ready: int = 0


class AmqpSource:
    """RabbitMQ queues as the migration driver's source (packit_broker.migrate.protocols)."""

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        layout: KombuLayout,
        *,
        window: int,
        read_ahead: int | None = None,
        mark: Callable[[str, Sequence[str]], None],
        committed: Callable[[bool], None],
        doubt: Callable[[Sequence[str]], None] = lambda task_ids: None,
        connect_timeout: float = 10,
    ) -> None:
        self.endpoint = endpoint
        self.layout = layout
        self.window = window
        #: prefetch per consumer: the driver's window (what is sent and not yet acknowledged,
        #: the most a crash can duplicate) plus deliveries buffered for the next read, so
        #: RabbitMQ keeps sending while a batch is written and acknowledged.
        self.prefetch = window + (window if read_ahead is None else read_ahead)
        self._mark = mark
        self._committed = committed
        self._doubt = doubt
        #: task ids RabbitMQ redelivered (another consumer, or an earlier run, had them),
        #: not yet handed to `doubt`
        self._redelivered: set[str] = set()
        self.connection = open_connection(
            endpoint, role="migrate (consumer)", connect_timeout=connect_timeout
        )
        self.lanes: dict[str, _Consuming] = {}
        self.held: list[HeldMessage] = []

    # -- lifecycle ----------------------------------------------------------------------------

    def connect(self) -> AmqpSource:
        self.connection.connect()
        return self

    def close(self) -> None:
        """Closing the connection requeues whatever was not acknowledged (held, buffered)."""
        try:
            self.connection.close()
        except Exception:
            self.connection.collect()

    # -- what RabbitMQ has -------------------------------------------------------------------

    def state(self, queue: str) -> QueueState | None:
        """Ready messages and consumers of `queue` (passive declare); None if it does not
        exist. A fresh channel: a NotFound closes the channel it happens on."""
        channel = self.connection.channel()
        try:
            _, ready, consumers = channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return None
        channel.close()
        return QueueState(queue, int(ready), int(consumers))

    def declared_differently(self, spec: QueueSpec) -> str | None:
        """RabbitMQ's refusal of `spec`'s declaration where the queue exists with other
        arguments (PRECONDITION_FAILED), else None; where they match, the declaration is a
        no-op: nothing changes. A fresh channel, as a refusal closes it."""
        channel = self.connection.channel()
        try:
            spec.declare_queue(channel)
        except amqp.exceptions.PreconditionFailed as exc:
            return str(exc.reply_text or exc)
        channel.close()
        return None

    def our_consumers(self, queue: str) -> int:
        lane = self.lanes.get(queue)
        return len(lane.tags) if lane else 0

    def others_consuming(self, queues: Sequence[str]) -> dict[str, int]:
        """Queue -> consumers that are not this run's (a worker still consuming RabbitMQ)."""
        found = {}
        for queue in queues:
            state = self.state(queue)
            if state is not None and state.consumers > self.our_consumers(queue):
                found[queue] = state.consumers - self.our_consumers(queue)
        return found

    def leftover(self, queue: str) -> int:
        """Messages of `queue` not moved and not held: ready in RabbitMQ, plus deliveries we
        buffered but never handed out (requeued when we close)."""
        lane = self.lanes.get(queue)
        state = self.state(queue)
        return (state.ready if state else 0) + (len(lane.buffer) if lane else 0)

    def counting_down(self) -> int:
        """Tasks waiting in kombu's delayed-delivery queues (countdowns on quorum queues): not
        in any worker queue yet, so not moved by a run that reads the worker queues."""
        waiting = 0
        for queue in delayed_delivery.LEVEL_QUEUES:
            state = self.state(queue)
            waiting += state.ready if state else 0
        return waiting

    def idle(self, seconds: float) -> None:
        """Wait while keeping the connection healthy (heartbeats; deliveries are buffered)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._drain(min(remaining, 1.0))

    # -- consuming -----------------------------------------------------------------------------

    def _lane(self, queue: str) -> _Consuming:
        lane = self.lanes.get(queue)
        if lane is None:
            channel = self.connection.channel()
            channel.auto_decode = False  # bodies stay the producer's exact bytes
            lane = _Consuming(queue, channel)
            self.lanes[queue] = lane
            self._consume(lane)
        return lane

    def _consume(self, lane: _Consuming) -> None:
        """One more consumer with a window of its own: held deliveries count against the
        prefetch of the consumer they came to, so capacity is added as they accumulate."""
        lane.channel.basic_qos(0, self.prefetch, False)

        def on_message(message: Any) -> None:
            delivery = Delivery.of(message)
            lane.buffer.append(delivery)
            lane.unacked[delivery.tag] = None

        tag = f"{CONSUMER_TAG}-{len(lane.tags)}-{id(self):x}"
        lane.tags.append(lane.channel.basic_consume(lane.queue, tag, callback=on_message))

    def _capacity(self, lane: _Consuming) -> int:
        return len(lane.tags) * self.prefetch - len(lane.unacked)

    def _drain(self, timeout: float) -> bool:
        try:
            self.connection.drain_events(timeout=timeout)
        except TimeoutError:
            return False
        finally:
            self.connection.heartbeat_tick()
        return True

    def _sync(self, lane: _Consuming) -> None:
        """A synchronous round trip on the lane's channel: RabbitMQ processes a channel's
        methods in order, so every ack sent before is processed; also reads the ready count."""
        _, ready, _ = lane.channel.queue_declare(lane.queue, passive=True)
        lane.ready = int(ready)

    # -- the driver's seam (packit_broker.migrate.protocols.Source) -----------------------------

    def read(self, lane: Lane, skip: int, count: int) -> list[Delivery]:
        """The next `count` deliveries beyond those handed out (`skip` of them), oldest first;
        fewer when the queue ran empty. Nothing is acknowledged."""
        consuming = self._lane(lane.key)
        waiting = len(consuming.buffer)
        since = time.monotonic()
        while len(consuming.buffer) < count and self._capacity(consuming) > 0:
            if self._drain(QUIET):
                if len(consuming.buffer) > waiting:
                    waiting, since = len(consuming.buffer), time.monotonic()
                continue
            self._sync(consuming)
            if consuming.ready == 0 and not self._drain(SETTLE):
                break
            if time.monotonic() - since > STALL:
                break
        taken = [consuming.buffer.popleft() for _ in range(min(count, len(consuming.buffer)))]
        for delivery in taken:
            if delivery.redelivered and (task_id := delivery.task_id) is not None:
                self._redelivered.add(task_id)
        return taken

    def decode(self, raw: bytes, lane: Lane) -> TaskMessage:
        if not isinstance(raw, Delivery):
            raise TypeError(f"not a delivery of this source: {raw!r}")
        try:
            return from_amqp(
                raw,
                raw.properties,
                exchange=raw.exchange,
                routing_key=raw.routing_key,
                max_priority=lane.target.max_priority,
                layout=self.layout,
            )
        except MalformedMessage as exc:
            raise MalformedMessage(_where(exc.reason, lane.key, raw)) from None

    def mark_inflight(self, where: str, task_ids: Sequence[str]) -> None:
        """Journal the ids about to be sent; those RabbitMQ redelivered are also listed (the
        report's `redelivered`, written with the batch in its transaction): a consumer had
        them before - a worker that stopped, perhaps mid-task; an earlier run whose ack RabbitMQ
        lost with a node after that run's journal was cleared; or one that stopped with them
        buffered; or a node restart - so the task may have started, or be in Redis already."""
        self._mark(where, task_ids)
        doubtful = [t for t in task_ids if t in self._redelivered]
        if doubtful:
            self._redelivered.difference_update(doubtful)
            self._doubt(doubtful)

    def commit(
        self, lane: Lane, entries: Sequence[bytes], quarantine: Sequence[int], *, keep_marker: bool
    ) -> None:
        """Acknowledge the accepted deliveries; hold the quarantined ones (never acked)."""
        consuming = self.lanes[lane.key]
        deliveries = [e for e in entries if isinstance(e, Delivery)]
        if len(deliveries) != len(entries):
            raise TypeError("commit() got entries this source did not read")
        held = set(quarantine)
        acked = [d.tag for i, d in enumerate(deliveries) if i not in held]
        oldest = list(itertools.islice(consuming.unacked, len(deliveries)))
        if acked and not held and oldest == acked:
            consuming.channel.basic_ack(acked[-1], multiple=True)
        else:
            for tag in acked:
                consuming.channel.basic_ack(tag)
        for tag in acked:
            del consuming.unacked[tag]
        for index in sorted(held):
            self._hold(consuming, deliveries[index])
        self._sync(consuming)
        self._committed(keep_marker)

    def _hold(self, lane: _Consuming, delivery: Delivery) -> None:
        """Keep a quarantined delivery unacknowledged; once held ones eat into the window, one
        more consumer (with a window of its own) keeps the driver's batches full."""
        lane.held += 1
        self.held.append(HeldMessage(lane.queue, delivery))
        if len(lane.tags) * self.prefetch - lane.held < self.window:
            self._consume(lane)


def _where(reason: str, queue: str, delivery: Delivery) -> str:
    return f"{reason}; left in RabbitMQ queue {queue!r} byte-exact ({delivery.describe()})"


def _text(headers: Any, key: str) -> str | None:
    if isinstance(headers, dict) and headers.get(key) is not None:
        return str(headers[key])
    return None


def _json_safe(value: Any) -> Any:
    """AMQP property values as JSON can show them (timestamps, byte arrays as text)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    return str(value)
