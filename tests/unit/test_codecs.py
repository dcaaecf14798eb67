"""The codecs both ways: kombu Redis envelope <-> TaskMessage <-> AMQP."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from packit_broker.codecs import (
    KEPT_PROPERTIES,
    amqp_priority,
    amqp_priority_of_bucket,
    bucket_of_amqp,
    from_amqp,
    from_redis,
    load_json,
    to_amqp,
    to_redis,
)
from packit_broker.kombu_layout import KombuLayout
from packit_broker.messages import MalformedMessage, TaskMessage

LAYOUTS = [KombuLayout(), KombuLayout(priority_steps=tuple(range(10)))]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text())
headers = st.fixed_dictionaries(
    {"task": st.text(min_size=1), "id": st.uuids().map(str)},
    optional={
        "eta": st.one_of(st.none(), st.text()),
        "expires": st.one_of(st.none(), st.text()),
        "retries": st.integers(0, 100),
        "argsrepr": st.text(),
    },
)
properties = st.fixed_dictionaries(
    {}, optional={k: st.text(min_size=1) for k in ("correlation_id", "reply_to", "message_id")}
)


@st.composite
def task_messages(draw: st.DrawFn, layout: KombuLayout = LAYOUTS[0]) -> TaskMessage:
    priority = draw(st.integers(0, 9))
    return TaskMessage(
        body=draw(st.binary(max_size=200)),
        headers=draw(headers),
        properties=draw(properties),
        content_type=draw(st.sampled_from([None, "application/json", "application/x-python"])),
        content_encoding=draw(st.sampled_from([None, "utf-8", "binary"])),
        priority=priority,
        bucket=layout.bucket_of(priority),
        exchange=draw(st.sampled_from(["", "celery", "tasks"])),
        routing_key=draw(st.text(min_size=1, max_size=20)),
    )


@given(task_messages(), st.text(min_size=1, max_size=20))
def test_redis_envelope_round_trip(message: TaskMessage, queue: str) -> None:
    assert from_redis(to_redis(message, queue)) == message


@given(task_messages())
def test_redis_envelope_is_kombus(message: TaskMessage) -> None:
    """What a Redis worker's kombu reads: base64 body, delivery_info, a delivery tag."""
    envelope: dict[str, Any] = json.loads(to_redis(message, "q"))
    props = envelope["properties"]
    assert props["body_encoding"] == "base64"
    assert props["delivery_info"] == {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
    }
    assert props["priority"] == message.priority and props["delivery_tag"]
    assert envelope["headers"] == message.headers


@given(task_messages(), st.sampled_from([9, 10, 255]))
def test_amqp_round_trip_keeps_message_and_bucket(message: TaskMessage, max_priority: int) -> None:
    out = to_amqp(message, queue="q", max_priority=max_priority)
    back = from_amqp(
        out.body,
        out.properties,
        exchange=out.exchange,
        routing_key=out.routing_key,
        max_priority=max_priority,
    )
    assert back.body == message.body and back.headers == message.headers
    assert back.properties == {k: v for k, v in message.properties.items() if k in KEPT_PROPERTIES}
    assert (back.content_type, back.content_encoding) == (
        message.content_type,
        message.content_encoding,
    )
    assert back.bucket == message.bucket


def test_priority_mapping_is_inverted_and_invertible() -> None:
    for layout in LAYOUTS:
        for max_priority in (9, 10, 255):
            steps = layout.reachable_steps()
            mapped = [amqp_priority_of_bucket(step, max_priority) for step in steps]
            assert mapped == sorted(mapped, reverse=True)  # kombu's first bucket -> highest
            assert [bucket_of_amqp(p, max_priority, layout) for p in mapped] == list(steps)
    assert amqp_priority(2, 10) == amqp_priority(0, 10) == 10  # same bucket, same priority
    # RabbitMQ serves "no priority" as 0, the least urgent: so must the Redis side.
    assert bucket_of_amqp(None, 10) == bucket_of_amqp(0, 10) == 9
    assert bucket_of_amqp(3, None) == bucket_of_amqp(None, None) == 0


@pytest.mark.parametrize(
    ("exchange", "routing_key", "kept"),
    [
        ("celery", "celery", True),  # the queue's own binding: Redis routes it back
        ("dlx.celery", "celery", False),  # dead-lettered: Redis knows no such exchange
        ("celery", "other", False),  # a custom route Redis has no binding for
        ("", "celery", False),  # the default exchange: written as such anyway
    ],
)
def test_redis_delivery_info_is_a_route_redis_can_restore(
    exchange: str, routing_key: str, kept: bool
) -> None:
    """kombu restores an unacked entry by its delivery_info; a route Redis has no binding
    for would restore it nowhere (dropped), so only the queue's own binding is kept."""
    message = TaskMessage(b"{}", {"id": "t"}, exchange=exchange, routing_key=routing_key)
    envelope = json.loads(to_redis(message, "celery", ("celery", "celery")))
    expected = (
        {"exchange": exchange, "routing_key": routing_key}
        if kept
        else {
            "exchange": "",
            "routing_key": "celery",
        }
    )
    assert envelope["properties"]["delivery_info"] == expected


def test_a_json_error_reads_as_one_sentence() -> None:
    # json's own message for an unterminated string ends in "starting at".
    with pytest.raises(MalformedMessage) as caught:
        load_json(b'{"body": "abc')
    assert str(caught.value) == "not JSON: Unterminated string starting at (character 9)"
    assert "at at" not in str(caught.value)


def test_a_header_integer_beyond_64_bits_is_refused_for_that_message() -> None:
    message = TaskMessage(b"{}", {"task": "t", "id": "1", "meta": {"n": [1, 2**64]}})
    with pytest.raises(MalformedMessage, match=r"header headers\.meta\.n\[1\] holds an integer"):
        to_amqp(message, queue="q", max_priority=None)
    # The premise: py-amqp itself cannot write it.
    import amqp

    with pytest.raises(struct.error):
        amqp.Message(b"", application_headers={"n": 2**64})._serialize_properties()


def test_headers_larger_than_a_frame_are_refused_smaller_ones_pass() -> None:
    big = TaskMessage(b"{}", {"task": "t", "id": "1", "argsrepr": "x" * 140_000})
    with pytest.raises(MalformedMessage, match="content header frame holds"):
        to_amqp(big, queue="q", max_priority=None)
    fits = TaskMessage(b"{}", {"task": "t", "id": "1", "argsrepr": "x" * 60_000})
    assert to_amqp(fits, queue="q", max_priority=None).headers["argsrepr"] == "x" * 60_000
    edge = [2**63 - 1, -(2**63), True]
    assert to_amqp(TaskMessage(b"{}", {"id": "1", "v": edge}), queue="q", max_priority=None)


def test_amqp_only_header_types_survive_redis_as_kombu_writes_them() -> None:
    import datetime as dt
    from decimal import Decimal

    from kombu.utils.json import loads as kombu_loads

    stamp = dt.datetime(2026, 1, 2, 3, 4, 5)
    death = [{"count": 1, "queue": "q", "reason": "rejected", "time": stamp}]
    headers = {"task": "t", "id": "1", "x-death": death, "cost": Decimal("1.5"), "raw": b"\x00"}
    headers["bin"] = b"\xff\x00"
    raw = to_redis(TaskMessage(b"{}", headers), "q")
    assert kombu_loads(raw)["headers"]["x-death"][0]["time"] == stamp  # a Redis worker's view
    back = from_redis(raw)
    assert back.headers["x-death"][0]["time"] == stamp
    assert back.headers["cost"] == Decimal("1.5") and back.headers["raw"] == b"\x00"
    assert back.headers["bin"] == b"\xff\x00"
    assert to_amqp(back, queue="q", max_priority=None).headers["x-death"] == death


def test_typed_values_amqp_cannot_hold_stay_as_they_are_never_an_error() -> None:
    odd = {
        "wide": {"__type__": "decimal", "__value__": "12345678901"},
        "uuid": {"__type__": "uuid", "__value__": "not-even-a-uuid"},
        "bad": {"__type__": "datetime", "__value__": "yesterday"},
        "extra": {"__type__": "datetime", "__value__": "2026-01-01", "more": 1},
    }
    raw = json.dumps({**json.loads(to_redis(TaskMessage(b"{}", {"task": "t", "id": "1"}), "q"))})
    envelope = json.loads(raw)
    envelope["headers"].update(odd)
    back = from_redis(json.dumps(envelope).encode())
    assert {k: back.headers[k] for k in odd} == odd
    assert to_amqp(back, queue="q", max_priority=None).headers["wide"] == odd["wide"]
