"""I/O: publishing to RabbitMQ with a window of publisher confirms, `mandatory` on.

A batch counts as delivered only when every message in it is acked by the broker and none was
returned (unroutable) or nacked; anything else raises `PublishFailed` and the caller leaves
the batch in Redis.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import amqp

from packit_broker.config import BrokerEndpoint
from packit_broker.envelope import AmqpMessage
from packit_broker.queues import QueueSpec
from packit_broker.tls import amqp_ssl_options


class PublishFailed(RuntimeError):
    """The broker did not confirm a batch (nack, return, timeout or a lost connection)."""


class AmqpSink:
    def __init__(
        self, endpoint: BrokerEndpoint, *, connect_timeout: float = 10, confirm_timeout: float = 60
    ) -> None:
        self.endpoint = endpoint
        self.confirm_timeout = confirm_timeout
        self.connection = amqp.Connection(
            str(endpoint.dial),
            userid=endpoint.username,
            password=endpoint.password,
            virtual_host=endpoint.vhost,
            ssl=amqp_ssl_options(endpoint.tls) if endpoint.tls else False,
            heartbeat=endpoint.heartbeat,
            connect_timeout=connect_timeout,
        )
        self.channel: Any = None
        self._last_tag = 0
        self._pending: set[int] = set()
        self._problems: list[str] = []

    def connect(self) -> AmqpSink:
        self.connection.connect()
        self.channel = self.connection.channel()
        self.channel.confirm_select()
        self.channel.events["basic_ack"].add(self._on_ack)
        self.channel.events["basic_nack"].add(self._on_nack)
        self.channel.events["basic_return"].add(self._on_return)
        return self

    def close(self) -> None:
        try:
            self.connection.close()
        except Exception:
            self.connection.collect()

    def __enter__(self) -> AmqpSink:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def declare(self, spec: QueueSpec) -> None:
        spec.declare(self.channel)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self._pending = {t for t in self._pending if t > tag}
        else:
            self._pending.discard(tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._problems.append(f"broker nacked delivery {tag}")
        self._on_ack(tag, multiple)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._problems.append(
            f"unroutable: exchange {exchange!r} routing key {routing_key!r} ({exc})"
        )

    def publish(self, messages: Sequence[AmqpMessage]) -> None:
        """Publish all, then wait until every one is confirmed; raise PublishFailed otherwise."""
        self.send(messages)
        self.wait()

    def send(self, messages: Sequence[AmqpMessage]) -> None:
        """Publish without waiting; `wait()` must follow before the next `send()`."""
        self._problems.clear()
        for message in messages:
            self.channel.basic_publish(
                amqp.Message(message.body, **message.properties),
                exchange=message.exchange,
                routing_key=message.routing_key,
                mandatory=True,
            )
            self._last_tag += 1
            self._pending.add(self._last_tag)

    def wait(self) -> None:
        """Block until everything sent is confirmed; PublishFailed on nack/return/timeout."""
        self._wait_for_confirms()
        self.connection.heartbeat_tick()

    def _wait_for_confirms(self) -> None:
        deadline = time.monotonic() + self.confirm_timeout
        while self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishFailed(
                    f"{len(self._pending)} messages not confirmed within {self.confirm_timeout}s"
                )
            try:
                self.connection.drain_events(timeout=min(remaining, 1.0))
            except TimeoutError:
                continue
        if self._problems:
            raise PublishFailed("; ".join(self._problems[:3]))
