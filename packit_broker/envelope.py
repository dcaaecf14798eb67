"""Pure: kombu's Redis envelope -> the AMQP message a Celery worker expects.

The forward direction in one call, kept for its callers; the two halves (and their inverses)
live in packit_broker/codecs.py, through the neutral packit_broker.messages.TaskMessage.
"""

from __future__ import annotations

from packit_broker.codecs import (
    DEFAULT_LAYOUT,
    KEPT_PROPERTIES,
    AmqpMessage,
    amqp_priority,
    from_redis,
    redis_bucket,
    split_unacked,
    to_amqp,
)
from packit_broker.kombu_layout import KombuLayout
from packit_broker.messages import MalformedMessage

__all__ = [
    "KEPT_PROPERTIES",
    "AmqpMessage",
    "MalformedMessage",
    "amqp_priority",
    "decode",
    "redis_bucket",
    "split_unacked",
]


def decode(
    raw: bytes,
    *,
    queue: str,
    max_priority: int | None,
    binding: tuple[str, str] | None = None,
    max_size: int | None = None,
    layout: KombuLayout = DEFAULT_LAYOUT,
) -> AmqpMessage:
    """Decode one Redis list entry of `queue` into the message to publish to that queue.

    `binding` is the (exchange, routing key) the queue is bound with in RabbitMQ; `layout`
    says which priority buckets the app's kombu used (their order is what is kept).
    """
    return to_amqp(
        from_redis(raw, layout),
        queue=queue,
        max_priority=max_priority,
        binding=binding,
        max_size=max_size,
    )
