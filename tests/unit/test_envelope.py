"""Pure envelope decoding and priority mapping."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packit_broker.envelope import (
    MalformedMessage,
    amqp_priority,
    decode,
    redis_bucket,
    split_unacked,
)


def envelope(**overrides: object) -> bytes:
    env: dict[str, object] = {
        "body": base64.b64encode(b'[["x"], {}, {}]').decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "t.add", "id": "abc", "eta": None, "retries": 2},
        "properties": {
            "correlation_id": "abc",
            "reply_to": "r",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "q", "routing_key": "q"},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": "tag",
        },
    }
    env.update(overrides)
    return json.dumps(env).encode()


def test_decode_keeps_everything_a_worker_reads() -> None:
    message = decode(envelope(), queue="q", max_priority=None)
    assert message.body == b'[["x"], {}, {}]'
    assert message.properties["application_headers"]["retries"] == 2
    assert message.properties["correlation_id"] == "abc"
    assert message.properties["reply_to"] == "r"
    assert message.properties["delivery_mode"] == 2
    assert message.properties["content_type"] == "application/json"
    assert "priority" not in message.properties
    assert "delivery_tag" not in message.properties and "body_encoding" not in message.properties
    assert (message.exchange, message.routing_key) == ("", "q")
    assert message.task_id == "abc"


def test_stored_exchange_kept_only_where_the_queue_binding_routes_it() -> None:
    assert decode(envelope(), queue="q", max_priority=None, binding=("q", "q")).exchange == "q"
    other = decode(envelope(), queue="q", max_priority=None, binding=("x", "q"))
    assert (other.exchange, other.routing_key) == ("", "q")


def test_plain_text_body_and_compressed_body_untouched() -> None:
    props = {"body_encoding": None, "delivery_tag": "t"}
    plain = decode(envelope(body="héllo", properties=props), queue="q", max_priority=None)
    assert plain.body == "héllo".encode()
    raw = b"\x1f\x8b\x08compressed"
    headers = {"task": "t", "id": "1", "compression": "application/x-gzip"}
    zipped = decode(
        envelope(body=base64.b64encode(raw).decode(), headers=headers), queue="q", max_priority=None
    )
    assert zipped.body == raw
    assert zipped.properties["application_headers"]["compression"] == "application/x-gzip"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (json.dumps({"headers": {"task": "t", "id": "1"}}).encode(), "no 'body'"),
        (envelope(body="%%%"), "base64"),
        (envelope(properties={"body_encoding": "rot13"}), "unknown body_encoding"),
        (envelope(headers={}), "protocol 1"),
        (envelope(properties={"priority": "high", "body_encoding": "base64"}), "priority"),
    ],
)
def test_malformed_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        decode(raw, queue="q", max_priority=10)


def test_oversized_body() -> None:
    with pytest.raises(MalformedMessage, match="exceeds"):
        decode(envelope(), queue="q", max_priority=None, max_size=3)


def test_priority_inverted_per_bucket() -> None:
    assert [amqp_priority(p, 10) for p in (0, 1, 2, 3, 5, 6, 8, 9)] == [10, 10, 10, 7, 7, 3, 3, 0]
    assert amqp_priority(4, None) is None
    assert [redis_bucket(p) for p in (-5, 0, 2, 3, 7, 9, 42)] == [0, 0, 0, 3, 6, 9, 9]


@given(a=st.integers(-3, 12), b=st.integers(-3, 12), top=st.integers(1, 255))
def test_priority_never_inverts_order(a: int, b: int, top: int) -> None:
    """Redis serves a lower number first; RabbitMQ a higher one: the mapping must agree."""
    pa, pb = amqp_priority(a, top), amqp_priority(b, top)
    assert pa is not None and pb is not None and 0 <= pa <= top
    if redis_bucket(a) < redis_bucket(b):
        assert pa >= pb


def test_unacked_entry_split() -> None:
    env = json.loads(envelope())
    raw, exchange, key = split_unacked(json.dumps([env, "q", "q"]).encode())
    assert (exchange, key) == ("q", "q") and json.loads(raw) == env
    with pytest.raises(MalformedMessage):
        split_unacked(b'{"a": 1}')


@settings(max_examples=500, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "body",
                            "properties",
                            "headers",
                            "task",
                            "id",
                            "body_encoding",
                            "priority",
                            "content-type",
                        ]
                    ),
                    children,
                    max_size=5,
                )
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_hostile_input_only_raises_malformed(raw: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode(raw, queue="q", max_priority=10)
    with contextlib.suppress(MalformedMessage):
        split_unacked(raw)
