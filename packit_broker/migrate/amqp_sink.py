"""I/O: publishing to RabbitMQ with a window of publisher confirms, `mandatory` on.

`send(batch)` publishes a batch and returns a ticket; `wait(ticket)` blocks until RabbitMQ has
settled every message of that batch and returns the ones it refused (nacked, or returned as
unroutable), each with its index in the batch and the broker's reason. Several batches may be
in flight at once, so the caller can read and publish the next batch while the previous one is
being confirmed; every refusal is attributed to its own message, so one poison message never
fails its batch.

A nack is first taken for what it usually is, a passing state of the queue (a quorum queue
electing a new leader after a node loss, a node restarting): the nacked messages are published
again with growing pauses, up to `nack_retry_seconds`. Only a message the queue keeps refusing
while it accepts others after it is a poison message, refused alone. A queue that accepts
nothing for the whole window fails the run instead (its batch stays in Redis; a following run
waits that out over a new connection): quarantining a healthy batch because its queue had no
leader would strand it. A retried message lands behind
those published meanwhile (FIFO within its priority is kept for all others).

What fails the whole run instead raises `Diagnosed` (or the client library's error): a queue
declared with other arguments, a resource alarm that outlasts `blocked_timeout`, a message
over the broker's max_message_size (RabbitMQ closes the channel), a lost connection (which
the migration reconnects: packit_broker.migrate.run, `Migration._reconnect`, after `abandon()`
drops the dead one without a Close handshake).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import amqp
from amqp import spec

from packit_broker import delayed_delivery, errors
from packit_broker.amqp_client import open_connection
from packit_broker.codecs import AmqpMessage, to_amqp
from packit_broker.config import BrokerEndpoint
from packit_broker.messages import TaskMessage
from packit_broker.migrate.protocols import Rejection, Ticket
from packit_broker.queues import QueueSpec

DEFAULT_BLOCKED_TIMEOUT = 300.0
#: How long nacked messages are retried: a quorum queue's leader election after a node loss
#: takes seconds; a restarting node's queue up to its boot time.
DEFAULT_NACK_RETRY_SECONDS = 30.0
FIRST_NACK_RETRY = 0.25  # then doubling, within DEFAULT_NACK_RETRY_SECONDS
#: Bodies above this are published alone, after everything before them is confirmed: if
#: RabbitMQ's max_message_size closes the channel over one, nothing else is left uncertain.
FENCE_ABOVE = 64 * 1024
POLL_EVERY = 64  # publishes between two looks at what the broker sent (acks, blocked)
#: ... or fewer, once this many body bytes went out unread: a blocked connection is no longer
#: read by RabbitMQ, and our writes must not fill the socket buffers (then a write would block
#: for good) before `connection.blocked` is seen.
POLL_BYTES = 1024 * 1024


class PublishFailed(errors.Diagnosed):
    """RabbitMQ did not settle a batch: no confirm in time, or a return that matches nothing."""

    def __init__(self, endpoint: str, seen: str) -> None:
        super().__init__(
            errors.Diagnosis(
                errors.RABBITMQ,
                "publisher-confirm",
                endpoint,
                seen,
                "the broker is overloaded or a queue is unavailable (a quorum queue without a"
                " majority): check `rabbitmq-diagnostics status` and the broker's log, then"
                " rerun; the unconfirmed batch is still in Redis",
            )
        )


@dataclass
class AmqpTicket(Ticket):
    """A Ticket that also holds what RabbitMQ nacked, to be published again."""

    #: (index in the batch, message, when first nacked)
    nacked: list[tuple[int, AmqpMessage, float]] = field(default_factory=list)
    #: (index in the batch, message) returned as NO_ROUTE: its queue vanished (deleted)
    unroutable: list[tuple[int, AmqpMessage]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        # nacked and unroutable ones are published again by `wait`
        return self.settled and not self.nacked and not self.unroutable


class AmqpSink:
    """The RabbitMQ sink of the migration driver (packit_broker.migrate.protocols.Sink)."""

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        *,
        connect_timeout: float = 10,
        confirm_timeout: float = 60,
        blocked_timeout: float = DEFAULT_BLOCKED_TIMEOUT,
        nack_retry_seconds: float = DEFAULT_NACK_RETRY_SECONDS,
        max_message_size: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.max_message_size = max_message_size
        self.confirm_timeout = confirm_timeout
        self.blocked_timeout = blocked_timeout
        self.nack_retry_seconds = nack_retry_seconds
        self.connection = open_connection(
            endpoint,
            role="migrate (publisher)",
            connect_timeout=connect_timeout,
            on_blocked=self._on_blocked,
            on_unblocked=self._on_unblocked,
        )
        self.channel: Any = None
        self._last_tag = 0
        self._low = 1  # every tag below is settled
        self._inflight: dict[int, tuple[AmqpTicket, int, AmqpMessage]] = {}
        self._returned: dict[int, tuple[int, str]] = {}  # tag -> (reply code, reason)
        self._unmatched: list[str] = []
        self._blocked: tuple[str, float] | None = None
        self._broken = False
        self._size_limit: int | None = None  # RabbitMQ's max_message_size, once learnt
        self._published = 0
        self._unpolled = 0  # body bytes published since the last poll
        #: Tasks not yet due (the run shares its report's summary with each sink it opens).
        self.etas = delayed_delivery.EtaSummary()
        self._accepted_at: dict[str, float] = {}  # routing key -> when RabbitMQ last acked one
        #: (exchange, routing key) -> the queue it was encoded for, to declare a vanished one
        self._targets: dict[tuple[str, str], QueueSpec] = {}
        #: told the name of each queue declared again because it had vanished
        self.on_redeclare: Callable[[str], None] = lambda queue: None
        #: told what an operator should know at once (an alarm blocking publishers)
        self.on_notice: Callable[[str], None] = lambda text: None

    # -- lifecycle ----------------------------------------------------------------------------

    def connect(self) -> AmqpSink:
        self.connection.connect()
        self._open_channel()
        return self

    def _open_channel(self) -> None:
        """A confirm-mode channel; its delivery tags start again at 1 (nothing is in flight)."""
        self.channel = self.connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        self._last_tag, self._low = 0, 1

    def close(self) -> None:
        if self._broken:  # a blocked broker does not read our Close: just drop the socket
            self.connection.collect()
            return
        try:
            self.connection.close()
        except Exception:
            self.connection.collect()

    def abandon(self) -> None:
        """Drop the connection without a Close handshake: after it failed mid-run there is
        nobody to answer (a Close would wait for a dead node's CloseOk)."""
        with contextlib.suppress(Exception):  # already half torn down by py-amqp
            # Non-blocking first: closing TLS waits for the peer's close_notify, and a frozen
            # or cut-off node never sends one (that wait was the socket timeout, 10 s).
            sock = getattr(self.connection.transport, "sock", None)
            if sock is not None:
                sock.settimeout(0)
        with contextlib.suppress(Exception):
            self.connection.collect()

    def __enter__(self) -> AmqpSink:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the driver's seam ----------------------------------------------------------------------

    def prepare(self, target: QueueSpec) -> None:
        self.declare(target)
        delayed_delivery.declare(self.connection, target)
        # The routes of what is published for it without `encode` (the unacked entries)
        self._targets[(target.exchange, target.routing_key)] = target
        self._targets[("", target.name)] = target

    def encode(self, message: TaskMessage, target: QueueSpec) -> AmqpMessage:
        """What reaches `target` (its own binding kept, or through delayed delivery when it is
        a quorum queue and the task is not due yet); MalformedMessage if it cannot."""
        encoded = to_amqp(
            message,
            queue=target.name,
            max_priority=target.max_priority,
            binding=(target.exchange, target.routing_key),
            max_size=self.max_message_size,
        )
        now = dt.datetime.now(dt.UTC)
        route = delayed_delivery.delayed_route(target, message.headers, now)
        seconds = delayed_delivery.delay_seconds(message.headers, now)
        self.etas.add(target, seconds, route is not None)
        if route is not None:
            encoded = dataclasses.replace(encoded, exchange=route[0], routing_key=route[1])
        self._targets[(encoded.exchange, encoded.routing_key)] = target
        return encoded

    # -- declarations ---------------------------------------------------------------------------

    def declare(self, queue: QueueSpec) -> None:
        """Declare as the workers do; a queue with other arguments -> `Diagnosed`."""
        try:
            queue.declare(self.channel)
        except amqp.exceptions.PreconditionFailed as exc:
            raise self._mismatch(queue, exc) from None

    def check_existing(self, queue: QueueSpec) -> None:
        """A dry run's declaration, changing nothing: a queue that exists is declared alone
        (not its exchange, binding or dead-letter queue), which is a no-op when its arguments
        match and `Diagnosed` when not; one that does not exist yet is left alone."""
        channel = self.connection.channel()
        try:
            channel.queue_declare(queue.name, passive=True)
        except amqp.exceptions.NotFound:
            return  # the real run declares it
        try:
            self._redeclare(queue, queue.arguments)
        except amqp.exceptions.PreconditionFailed as exc:
            raise self._mismatch(queue, exc) from None

    def _mismatch(self, queue: QueueSpec, exc: Any) -> errors.Diagnosed:
        text = str(exc.reply_text or exc)
        existing = errors.existing_arguments(
            lambda arguments: self._redeclare(queue, arguments), queue.arguments, text
        )
        return errors.Diagnosed(
            errors.queue_mismatch(
                self.endpoint.display_url, queue.name, queue.arguments, existing, text
            )
        )

    def _redeclare(self, queue: QueueSpec, arguments: Mapping[str, Any]) -> None:
        channel = self.connection.channel()
        queue.declare_queue(channel, arguments)
        channel.close()

    # -- broker events --------------------------------------------------------------------------

    def _on_blocked(self, reason: str) -> None:
        self._blocked = (reason, time.monotonic())

    def _on_unblocked(self) -> None:
        self._blocked = None

    def _settle(self, tag: int, refusal: str | None) -> None:
        found = self._inflight.pop(tag, None)
        if found is None:
            return
        ticket, index, message = found
        returned = self._returned.pop(tag, None)
        if returned is not None and returned[0] == errors.NO_ROUTE and self._target_of(message):
            ticket.unroutable.append((index, message))
        elif returned is not None:
            ticket.refused.append(Rejection(index, returned[1]))
        elif refusal == errors.NACK_REASON:
            ticket.nacked.append((index, message, time.monotonic()))
        elif refusal is not None:
            ticket.refused.append(Rejection(index, refusal))
        else:
            self._accepted_at[message.routing_key] = time.monotonic()
        ticket.outstanding -= 1

    def _settle_through(self, tag: int, multiple: bool, refusal: str | None) -> None:
        if not multiple:
            self._settle(tag, refusal)
            return
        for pending in range(self._low, tag + 1):  # each tag is visited once in total
            self._settle(pending, refusal)
        self._low = max(self._low, tag + 1)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle_through(tag, multiple, None)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._settle_through(tag, multiple, errors.NACK_REASON)

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        """A return precedes the ack of its own publish; find that publish by its content."""
        code = int(getattr(exc, "reply_code", None) or getattr(exc, "code", 0) or 0)
        reason = errors.return_reason(
            code, str(getattr(exc, "reply_text", "") or exc), exchange, routing_key
        )
        body = message.body
        if isinstance(body, str):  # py-amqp decoded it by its content_encoding: undo that
            body = body.encode(message.properties.get("content_encoding") or "utf-8")
        for tag in range(self._low, self._last_tag + 1):
            found = self._inflight.get(tag)
            if found is None or tag in self._returned:
                continue
            sent = found[2]
            if (sent.exchange, sent.routing_key, sent.body) == (exchange, routing_key, body):
                self._returned[tag] = (code, reason)
                return
        self._unmatched.append(reason)  # never count a returned message as delivered

    # -- publishing -----------------------------------------------------------------------------

    def publish(self, messages: Sequence[AmqpMessage]) -> list[Rejection]:
        """Publish all and wait until each is settled; the refused ones, with reasons."""
        return self.wait(self.send(messages))

    def send(self, messages: Sequence[AmqpMessage]) -> AmqpTicket:
        """Publish without waiting for confirms; pass the ticket to `wait()` later."""
        ticket = AmqpTicket(len(messages), len(messages))
        for index, message in enumerate(messages):
            if self._blocked is not None:
                self._wait_unblocked()
            if len(message.body) > FENCE_ABOVE:
                self._publish_alone(ticket, index, message)
                continue
            self._publish_one(message)
            self._track(ticket, index, message)
        return ticket

    def _track(self, ticket: AmqpTicket, index: int, message: AmqpMessage) -> None:
        self._last_tag += 1
        self._inflight[self._last_tag] = (ticket, index, message)

    def _publish_alone(self, ticket: AmqpTicket, index: int, message: AmqpMessage) -> None:
        """A large message, fenced: if RabbitMQ refuses its size, it alone is refused."""
        self._settle_everything()
        size = len(message.body)
        if self._size_limit is not None and size > self._size_limit:
            ticket.refused.append(Rejection(index, errors.too_large_reason(size, self._size_limit)))
            ticket.outstanding -= 1
            return
        try:
            self.channel.basic_publish(
                amqp.Message(message.body, **message.properties),
                exchange=message.exchange,
                routing_key=message.routing_key,
                mandatory=True,
            )
            self._track(ticket, index, message)
            self._settle_everything(raw=True)
        except amqp.exceptions.PreconditionFailed as exc:
            found = errors.too_large(str(exc))
            if found is None:
                raise
            self._size_limit = found[1]
            self._inflight.clear()  # only this message was in flight
            ticket.refused.append(Rejection(index, errors.too_large_reason(size, found[1])))
            ticket.outstanding -= 1
            self._open_channel()

    def _settle_everything(self, *, raw: bool = False) -> None:
        """Wait until nothing is in flight (every ticket's messages settled)."""
        deadline = time.monotonic() + self.confirm_timeout
        while self._inflight:
            if self._blocked is not None:
                self._wait_unblocked()
                deadline = time.monotonic() + self.confirm_timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishFailed(
                    self.endpoint.display_url,
                    f"{len(self._inflight)} messages not confirmed within {self.confirm_timeout}s",
                )
            self._drain(min(remaining, 1.0), raw=raw)

    def _publish_one(self, message: AmqpMessage) -> None:
        """basic.publish, mandatory. py-amqp's basic_publish polls the socket before every
        publish (for connection.blocked); here that poll happens every POLL_EVERY messages or
        POLL_BYTES, which is as timely for an alarm and saves a system call per message."""
        try:
            self._published += 1
            self._unpolled += len(message.body)
            if self._published % POLL_EVERY == 0 or self._unpolled >= POLL_BYTES:
                self._unpolled = 0
                self._drain(0)
            self.channel.send_method(
                spec.Basic.Publish,
                "Bssbb",
                (0, message.exchange, message.routing_key, True, False),
                amqp.Message(message.body, **message.properties),
            )
        except amqp.exceptions.PreconditionFailed as exc:
            self._too_large(exc, message)
            raise

    def _too_large(self, exc: BaseException, sending: AmqpMessage | None = None) -> None:
        """RabbitMQ closed the channel over max_message_size: name the message and the limit."""
        found = errors.too_large(str(exc))
        if found is None:
            return
        size, limit = found
        candidates = [m for _, _, m in self._inflight.values()] + ([sending] if sending else [])
        culprit = next((m for m in candidates if len(m.body) == size), None)
        what = f"task {culprit.task_id} for {culprit.routing_key!r}" if culprit else "a message"
        raise errors.Diagnosed(
            errors.message_too_large(self.endpoint.display_url, size, limit, what)
        ) from None

    def wait(self, ticket: Ticket) -> list[Rejection]:
        """Block until every message of `ticket` is settled; the refused ones, in batch order.

        Nacked messages are published again first (see the module's docstring)."""
        if not isinstance(ticket, AmqpTicket):
            raise TypeError(f"not a ticket of this sink: {ticket!r}")
        self._await(ticket)
        self._retry_unroutable(ticket)
        self._retry_nacked(ticket)
        return sorted(ticket.refused, key=lambda refusal: refusal.index)

    def _target_of(self, message: AmqpMessage) -> QueueSpec | None:
        return self._targets.get((message.exchange, message.routing_key))

    def _retry_unroutable(self, ticket: AmqpTicket) -> None:
        """Messages returned as NO_ROUTE for a queue this sink declared: the queue vanished (an
        operator deleted it). Declare it again as the workers do (queues.py), say so, and
        publish them again; still unroutable is the environment (`Diagnosed`): the batch stays
        in Redis, never in quarantine."""
        if not ticket.unroutable:
            return
        returned, ticket.unroutable = ticket.unroutable, []
        targets = {t.name: t for _, m in returned if (t := self._target_of(m)) is not None}
        for target in targets.values():
            self.prepare(target)
            self.on_redeclare(target.name)
        again = self.send([message for _, message in returned])
        self._await(again)
        if again.unroutable:
            first = again.unroutable[0][1]
            name = next((t.name for t in targets.values() if self._target_of(first) is t), "?")
            raise errors.Diagnosed(
                errors.unroutable_after_redeclare(self.endpoint.display_url, name)
            )
        ticket.refused.extend(Rejection(returned[r.index][0], r.reason) for r in again.refused)
        ticket.nacked.extend((returned[i][0], m, t) for i, m, t in again.nacked)

    def _await(self, ticket: Ticket) -> None:
        deadline = time.monotonic() + self.confirm_timeout
        while not ticket.settled:
            if self._blocked is not None:
                self._wait_unblocked()
                deadline = time.monotonic() + self.confirm_timeout
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishFailed(
                    self.endpoint.display_url,
                    f"{ticket.outstanding} messages not confirmed within {self.confirm_timeout}s",
                )
            self._drain(min(remaining, 1.0))
        if self._unmatched:
            raise PublishFailed(
                self.endpoint.display_url,
                f"RabbitMQ returned a message that matches none in flight: {self._unmatched[0]}",
            )

    def _retry_nacked(self, ticket: AmqpTicket) -> None:
        """Publish nacked messages again, pausing 0.25, 0.5, 1, ... s, within the retry window;
        then sort what is still nacked into poison (its queue accepted others since) or a
        queue that refuses everything (the run fails, nothing of the batch is removed)."""
        pause, started = FIRST_NACK_RETRY, time.monotonic()
        while ticket.nacked and time.monotonic() + pause - started <= self.nack_retry_seconds:
            self._pause(pause)
            pause *= 2
            pending, ticket.nacked = ticket.nacked, []
            again = self.send([message for _, message, _ in pending])
            self._await(again)
            self._retry_unroutable(again)  # its queue deleted meanwhile: declared again
            ticket.refused.extend(Rejection(pending[r.index][0], r.reason) for r in again.refused)
            ticket.nacked = [(pending[i][0], m, pending[i][2]) for i, m, _ in again.nacked]
        for index, message, first_nacked in ticket.nacked:
            if self._accepted_at.get(message.routing_key, -1.0) <= first_nacked:
                raise errors.Diagnosed(
                    errors.queue_refuses_all(
                        self.endpoint.display_url,
                        message.routing_key,
                        time.monotonic() - started,
                    )
                )
            ticket.refused.append(Rejection(index, errors.NACK_REASON))
        ticket.nacked = []

    def _pause(self, seconds: float) -> None:
        """Sleep while still reading the connection (acks of other batches, heartbeats)."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self._drain(min(left, 1.0))

    def _drain(self, timeout: float, *, raw: bool = False) -> None:
        try:
            self.connection.drain_events(timeout=timeout)
        except TimeoutError:
            pass
        except amqp.exceptions.PreconditionFailed as exc:
            if not raw:
                self._too_large(exc)
            raise
        self.connection.heartbeat_tick()

    def idle(self, seconds: float) -> None:
        """Wait `seconds` while keeping the connection healthy: heartbeats sent and checked,
        alarms and stray acks read (a bridge idles for hours between producers' tasks)."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._drain(min(remaining, 1.0))

    def _wait_unblocked(self) -> None:
        """A resource alarm: say so at once, wait up to `blocked_timeout` for RabbitMQ to lift
        it, then fail; say when it was lifted."""
        if self._blocked is not None:
            self.on_notice(
                f"BLOCKED by RabbitMQ ({self._blocked[0]}): a memory or disk alarm stops every"
                f" publisher; waiting up to {self.blocked_timeout:g} s (--blocked-timeout) for"
                " it to be lifted; nothing is lost meanwhile"
            )
        started = time.monotonic()
        while self._blocked is not None:
            reason, since = self._blocked
            waited = time.monotonic() - since
            if waited >= self.blocked_timeout:
                self._broken = True
                raise errors.Diagnosed(
                    errors.blocked(self.endpoint.display_url, reason, self.blocked_timeout)
                )
            self._drain(min(1.0, self.blocked_timeout - waited))
        self.on_notice(f"unblocked after {time.monotonic() - started:.0f} s: moving on")
