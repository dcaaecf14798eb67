"""Pure codecs, both ways: kombu's Redis envelope <-> TaskMessage <-> AMQP message.

Kombu stores each message in Redis as JSON `{"body", "content-encoding", "content-type",
"headers", "properties"}`; the transport-only parts (`delivery_tag`, `body_encoding`) are
dropped on the way in and made anew on the way out, the body is the exact bytes the producer
sent. Priorities: Redis 0 is the most urgent, AMQP's highest number is; the *bucket* (the step
kombu files a message under) is what is mapped, so the order a queue is served in is kept.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from packit_broker.kombu_layout import MAX_PRIORITY as REDIS_MAX_PRIORITY
from packit_broker.kombu_layout import KombuLayout
from packit_broker.messages import MalformedMessage, TaskMessage

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


@dataclass(frozen=True)
class AmqpMessage:
    """What the AMQP sink publishes: basic properties as py-amqp takes them."""

    body: bytes
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    task_id: str | None = None
    redis_priority: int = 0
    headers: dict[str, Any] = field(default_factory=dict)


# -- priorities --------------------------------------------------------------------------------


def redis_bucket(priority: int, layout: KombuLayout = DEFAULT_LAYOUT) -> int:
    """The priority step kombu files a message under (default steps: 0-2 -> 0, 3-5 -> 3, ...)."""
    return layout.bucket_of(priority)


def amqp_priority_of_bucket(bucket: int, max_priority: int | None) -> int | None:
    """Redis step 0..9 (0 first) -> AMQP 0..max_priority (max first); None without priorities."""
    if max_priority is None:
        return None
    return round((REDIS_MAX_PRIORITY - bucket) * max_priority / REDIS_MAX_PRIORITY)


def amqp_priority(
    redis_priority: int, max_priority: int | None, layout: KombuLayout = DEFAULT_LAYOUT
) -> int | None:
    """Redis 0..9 (0 highest) -> AMQP 0..max_priority (max highest); None without priorities.

    The bucket, not the raw number, is inverted: Redis serves a bucket first-in first-out, so
    two messages of priority 0 and 2 must keep their order in RabbitMQ too.
    """
    return amqp_priority_of_bucket(redis_bucket(redis_priority, layout), max_priority)


def bucket_of_amqp(
    priority: int | None, max_priority: int | None, layout: KombuLayout = DEFAULT_LAYOUT
) -> int:
    """The inverse of `amqp_priority_of_bucket`: AMQP priority -> the Redis step it came from.

    On a priority queue RabbitMQ serves a message without priority as priority 0, the least
    urgent: so does the Redis side (the last bucket), or it would overtake prioritized ones."""
    if not max_priority:
        return layout.bucket_of(0)
    clamped = min(max(priority or 0, 0), max_priority)
    return layout.bucket_of(REDIS_MAX_PRIORITY - round(clamped * REDIS_MAX_PRIORITY / max_priority))


# -- kombu's Redis envelope ------------------------------------------------------------------


def load_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))  # kombu writes UTF-8; no UTF-16/32 sniffing
    except UnicodeDecodeError:
        raise MalformedMessage("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc.msg} (character {exc.pos})") from None
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


def from_redis(raw: bytes, layout: KombuLayout = DEFAULT_LAYOUT) -> TaskMessage:
    """One entry of a kombu Redis list -> the task message (MalformedMessage if it is none)."""
    envelope = load_json(raw)
    if b'"__type__"' in raw:  # a datetime, decimal or bytes kombu (or a rollback) wrote
        envelope = _kombu_restored(envelope)
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
    priority = _priority(properties)
    info = properties.get("delivery_info")
    exchange = routing_key = None
    if isinstance(info, dict):
        exchange, routing_key = info.get("exchange"), info.get("routing_key")
    return TaskMessage(
        body=body,
        headers=headers,
        properties={k: properties[k] for k in KEPT_PROPERTIES if properties.get(k) is not None},
        content_type=envelope.get("content-type"),
        content_encoding=envelope.get("content-encoding"),
        priority=priority,
        bucket=layout.bucket_of(priority),
        exchange=exchange if isinstance(exchange, str) else None,
        routing_key=routing_key if isinstance(routing_key, str) else None,
    )


def to_redis(message: TaskMessage, queue: str, binding: tuple[str, str] | None = None) -> bytes:
    """The task message -> the envelope kombu's Redis channel would have LPUSHed for it
    (base64 body, delivery_info, a fresh delivery_tag); it lands in the list of
    `message.bucket`.

    With `binding` (the queue's (exchange, routing key) as kombu's Redis knows it), the
    delivery_info keeps the stored route only if it is that binding, else the default
    exchange and the queue's name: kombu restores an unacked entry (warm shutdown, the
    visibility timeout) by that route, and one Redis has no binding for (a dead-letter or
    alternate exchange, custom routes) would be restored nowhere - dropped.
    """
    properties: dict[str, Any] = dict(message.properties)
    properties["delivery_mode"] = 2
    if binding is not None:
        exchange, routing_key = _target(message, queue, binding)
    else:
        exchange = message.exchange if message.exchange is not None else ""
        routing_key = message.routing_key if message.routing_key is not None else queue
    properties["delivery_info"] = {"exchange": exchange, "routing_key": routing_key}
    properties["priority"] = message.priority
    properties["body_encoding"] = "base64"
    properties["delivery_tag"] = str(uuid.uuid4())
    envelope = {
        "body": base64.b64encode(message.body).decode("ascii"),
        "content-encoding": message.content_encoding,
        "content-type": message.content_type,
        "headers": message.headers,
        "properties": properties,
    }
    return json.dumps(envelope, default=_kombu_typed).encode()


def _kombu_typed(value: Any) -> dict[str, Any]:
    """AMQP-only header types (a timestamp, e.g. in x-death; a decimal; a byte array) in the
    form kombu's own JSON writes them, which a Redis worker reads back as the same type and
    `from_redis` turns back into them on the way to AMQP."""
    from kombu.utils.json import JSONEncoder

    return dict(JSONEncoder().default(value))  # type: ignore[no-untyped-call]


def _kombu_restored(envelope: Any) -> Any:
    """kombu's typed values back to the AMQP types they stand for: datetime, bytes and a
    decimal AMQP can hold. Any other typed value (uuid, date, a decimal too wide), or one
    that does not parse, stays the JSON object it is, as before: never an error."""

    def restore(value: Any) -> Any:
        if isinstance(value, list):
            return [restore(v) for v in value]
        if not isinstance(value, dict):
            return value
        value = {k: restore(v) for k, v in value.items()}
        if value.keys() == {"__type__", "__value__"} and isinstance(value["__value__"], str):
            return _typed(value["__type__"], value["__value__"], value)
        return value

    return restore(envelope)


def _typed(kind: Any, text: str, original: dict[str, Any]) -> Any:
    import datetime as dt
    from decimal import Decimal, InvalidOperation

    try:
        if kind == "datetime":
            return dt.datetime.fromisoformat(text)
        if kind == "bytes":  # kombu's form for bytes that are UTF-8
            return text.encode("utf-8")
        if kind == "base64":
            return base64.b64decode(text.encode("ascii"), validate=True)
        if kind == "decimal":
            number = Decimal(text)
            exponent = number.as_tuple().exponent
            # py-amqp writes a decimal as an 8-bit scale and a signed 32-bit value
            if isinstance(exponent, int) and -255 <= exponent <= 0:
                scaled = int(number.scaleb(-exponent))
                if scaled in range(-(1 << 31), 1 << 31):
                    return number
    except (ValueError, TypeError, InvalidOperation, binascii.Error):
        pass
    return original


def split_unacked(raw: bytes) -> tuple[bytes, str, str]:
    """An `unacked` hash value `[envelope, exchange, routing_key]` -> (envelope JSON, ex, rk)."""
    entry = load_json(raw)
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], dict)):
        raise MalformedMessage("unacked entry is not [envelope, exchange, routing_key]")
    envelope, exchange, routing_key = entry
    return json.dumps(envelope).encode(), str(exchange or ""), str(routing_key or "")


# -- AMQP ---------------------------------------------------------------------------------------


def _target(message: TaskMessage, queue: str, binding: tuple[str, str] | None) -> tuple[str, str]:
    """Keep the stored exchange/routing key only where the queue's own binding routes it back to
    this queue alone; otherwise the default exchange, which reaches exactly `queue`."""
    if binding is not None and (message.exchange, message.routing_key) == binding:
        return binding
    return "", queue


#: AMQP's widest integer field: a signed 64-bit long-long (py-amqp writes `l`).
_INT64 = range(-(1 << 63), 1 << 63)
#: What a content header frame may hold, as this client negotiates (py-amqp's frame_max),
#: less the frame's own fields (class, weight, body size, property flags, frame envelope).
CONTENT_HEADER_LIMIT = 131072 - 32


def _carried_size(value: Any, path: str) -> int:
    """About how many bytes `value` takes in an AMQP field table; MalformedMessage for what
    AMQP cannot carry at all. Cheap (no serialisation): a bound, checked exactly only when
    it comes near the limit."""
    if isinstance(value, dict):
        return sum(len(str(k)) + 2 + _carried_size(v, f"{path}.{k}") for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_carried_size(v, f"{path}[{i}]") for i, v in enumerate(value)) + 5
    if isinstance(value, str | bytes):
        return len(value) * (4 if isinstance(value, str) else 1) + 5
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        raise MalformedMessage(
            f"header {path} holds an integer of {value.bit_length()} bits: AMQP carries at"
            " most 64-bit integers (a Redis worker would read it, RabbitMQ cannot)"
        )
    return 9


def _check_carried(props: dict[str, Any]) -> None:
    """Refuse, per message, properties AMQP cannot carry: a header integer beyond 64 bits, or
    properties larger than one content header frame (RabbitMQ would close the connection)."""
    estimate = _carried_size(props.get("application_headers") or {}, "headers")
    estimate += sum(len(str(v)) + 2 for k, v in props.items() if k != "application_headers")
    if estimate < CONTENT_HEADER_LIMIT // 2:
        return  # an upper bound (four bytes a character), and still far below the limit
    import amqp

    size = len(amqp.Message(b"", **props)._serialize_properties())
    if size > CONTENT_HEADER_LIMIT:
        raise MalformedMessage(
            f"its headers and properties take {size} bytes: an AMQP content header frame holds"
            f" at most {CONTENT_HEADER_LIMIT} (frame_max); RabbitMQ would close the connection"
        )


def to_amqp(
    message: TaskMessage,
    *,
    queue: str,
    max_priority: int | None,
    binding: tuple[str, str] | None = None,
    max_size: int | None = None,
) -> AmqpMessage:
    """The task message -> what to publish so that it reaches `queue` (and only it).

    `binding` is the (exchange, routing key) the queue is bound with in RabbitMQ.
    """
    if max_size is not None and len(message.body) > max_size:
        raise MalformedMessage(
            f"body of {len(message.body)} bytes exceeds the broker limit {max_size}"
        )
    props: dict[str, Any] = dict(message.properties)
    props["delivery_mode"] = 2
    props["application_headers"] = message.headers
    if message.content_type is not None:
        props["content_type"] = message.content_type
    if message.content_encoding is not None:
        props["content_encoding"] = message.content_encoding
    priority = amqp_priority_of_bucket(message.bucket, max_priority)
    if priority is not None:
        props["priority"] = priority
    _check_carried(props)
    exchange, routing_key = _target(message, queue, binding)
    return AmqpMessage(
        body=message.body,
        properties=props,
        exchange=exchange,
        routing_key=routing_key,
        task_id=message.task_id,
        redis_priority=message.priority,
        headers=message.headers,
    )


def from_amqp(
    body: bytes,
    properties: Mapping[str, Any],
    *,
    exchange: str,
    routing_key: str,
    max_priority: int | None,
    layout: KombuLayout = DEFAULT_LAYOUT,
) -> TaskMessage:
    """A consumed AMQP message -> the task message (the priority mapped back to its bucket)."""
    headers = properties.get("application_headers") or {}
    if not isinstance(headers, dict) or "task" not in headers or "id" not in headers:
        raise MalformedMessage("not a Celery protocol 2 task (no task/id headers)")
    priority = properties.get("priority")
    bucket = bucket_of_amqp(priority if isinstance(priority, int) else None, max_priority, layout)
    return TaskMessage(
        body=bytes(body),
        headers=dict(headers),
        properties={k: properties[k] for k in KEPT_PROPERTIES if properties.get(k) is not None},
        content_type=properties.get("content_type"),
        content_encoding=properties.get("content_encoding"),
        priority=bucket,
        bucket=bucket,
        exchange=exchange,
        routing_key=routing_key,
    )
