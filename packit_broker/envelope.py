"""Pure: kombu's Redis envelope -> the AMQP message a Celery worker expects.

Kombu stores each message in Redis as JSON `{"body", "content-encoding", "content-type",
"headers", "properties"}`; the transport-only parts (`delivery_tag`, `delivery_info`,
`body_encoding`) are dropped, the body is decoded to the exact bytes the producer sent, and the
priority is inverted (Redis: 0 is the highest; AMQP: the highest number is).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from packit_broker.kombu_layout import MAX_PRIORITY as REDIS_MAX_PRIORITY
from packit_broker.kombu_layout import KombuLayout

DEFAULT_LAYOUT = KombuLayout()
#: AMQP basic properties worth keeping; `user_id` is left out on purpose (RabbitMQ rejects a
#: user_id that is not the publishing user).
KEPT_PROPERTIES = (
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "app_id",
)


class MalformedMessage(ValueError):
    """The raw entry cannot become a faithful AMQP message; `reason` goes into the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AmqpMessage:
    body: bytes
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    task_id: str | None = None
    redis_priority: int = 0
    headers: dict[str, Any] = field(default_factory=dict)


def redis_bucket(priority: int, layout: KombuLayout = DEFAULT_LAYOUT) -> int:
    """The priority step kombu files a message under (default steps: 0-2 -> 0, 3-5 -> 3, ...)."""
    return layout.bucket_of(priority)


def amqp_priority(
    redis_priority: int, max_priority: int | None, layout: KombuLayout = DEFAULT_LAYOUT
) -> int | None:
    """Redis 0..9 (0 highest) -> AMQP 0..max_priority (max highest); None without priorities.

    The bucket, not the raw number, is inverted: Redis serves a bucket first-in first-out, so
    two messages of priority 0 and 2 must keep their order in RabbitMQ too.
    """
    if max_priority is None:
        return None
    step = redis_bucket(redis_priority, layout)
    return round((REDIS_MAX_PRIORITY - step) * max_priority / REDIS_MAX_PRIORITY)


def _load_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))  # kombu writes UTF-8; no UTF-16/32 sniffing
    except UnicodeDecodeError:
        raise MalformedMessage("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON ({exc.msg} at {exc.pos})") from None
    except ValueError as exc:  # e.g. numbers too long to convert
        raise MalformedMessage(f"not JSON ({exc})") from None


def _decode_body(envelope: dict[str, Any], properties: dict[str, Any]) -> bytes:
    body = envelope.get("body")
    encoding = properties.get("body_encoding")
    if encoding == "base64":
        if not isinstance(body, str):
            raise MalformedMessage("base64 body is not a string")
        try:
            return base64.b64decode(body.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise MalformedMessage("body is not valid base64") from None
    if encoding is not None:
        raise MalformedMessage(f"unknown body_encoding {encoding!r}")
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, bytes):
        return body
    raise MalformedMessage(f"body is {type(body).__name__}, expected a string")


def _priority(properties: dict[str, Any]) -> int:
    raw = properties.get("priority", 0)
    if raw is None:
        return 0
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise MalformedMessage(f"priority {raw!r} is not an integer")
    return raw


def _target(
    properties: dict[str, Any], queue: str, binding: tuple[str, str] | None
) -> tuple[str, str]:
    """Keep the stored exchange/routing key only where the queue's own binding routes it back to
    this queue alone; otherwise the default exchange, which reaches exactly `queue`."""
    info = properties.get("delivery_info")
    if binding is not None and isinstance(info, dict):
        stored = (info.get("exchange"), info.get("routing_key"))
        if stored == binding:
            return binding
    return "", queue


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
    envelope = _load_json(raw)
    if not isinstance(envelope, dict):
        raise MalformedMessage(f"envelope is a JSON {type(envelope).__name__}, not an object")
    for key in ("body", "properties"):
        if key not in envelope:
            raise MalformedMessage(f"envelope has no {key!r}")
    properties = envelope["properties"]
    headers = envelope.get("headers") or {}
    if not isinstance(properties, dict) or not isinstance(headers, dict):
        raise MalformedMessage("properties/headers are not JSON objects")
    if "task" not in headers or "id" not in headers:
        raise MalformedMessage(
            "not a Celery protocol 2 task (no task/id headers; protocol 1 bodies are not migrated)"
        )
    body = _decode_body(envelope, properties)
    if max_size is not None and len(body) > max_size:
        raise MalformedMessage(f"body of {len(body)} bytes exceeds the broker limit {max_size}")
    redis_priority = _priority(properties)
    amqp_props: dict[str, Any] = {
        key: properties[key] for key in KEPT_PROPERTIES if properties.get(key) is not None
    }
    amqp_props["delivery_mode"] = 2
    amqp_props["application_headers"] = headers
    if envelope.get("content-type") is not None:
        amqp_props["content_type"] = envelope["content-type"]
    if envelope.get("content-encoding") is not None:
        amqp_props["content_encoding"] = envelope["content-encoding"]
    priority = amqp_priority(redis_priority, max_priority, layout)
    if priority is not None:
        amqp_props["priority"] = priority
    task_id = headers.get("id")
    exchange, routing_key = _target(properties, queue, binding)
    return AmqpMessage(
        body=body,
        properties=amqp_props,
        exchange=exchange,
        routing_key=routing_key,
        task_id=str(task_id) if task_id is not None else None,
        redis_priority=redis_priority,
        headers=headers,
    )


def split_unacked(raw: bytes) -> tuple[bytes, str, str]:
    """An `unacked` hash value `[envelope, exchange, routing_key]` -> (envelope JSON, ex, rk)."""
    entry = _load_json(raw)
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], dict)):
        raise MalformedMessage("unacked entry is not [envelope, exchange, routing_key]")
    envelope, exchange, routing_key = entry
    return json.dumps(envelope).encode(), str(exchange or ""), str(routing_key or "")
