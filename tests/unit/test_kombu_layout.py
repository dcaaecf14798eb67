"""KombuLayout against the installed kombu's own code: same buckets, same key names."""

from __future__ import annotations

import types
from typing import Any

import pytest
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as kombu_virtual

from packit_broker.envelope import amqp_priority
from packit_broker.kombu_layout import (
    IGNORED_OPTIONS,
    KombuLayout,
    LayoutError,
    control_reason,
    guess_sep,
)

STEPS = [[0, 3, 6, 9], list(range(10)), [0, 5], [0], [1, 5, 9], [0, 4, 8, 12]]


def kombu_channel(options: dict[str, Any]) -> Any:
    """The attributes kombu's Channel takes from transport options, and its own methods."""
    channel = types.SimpleNamespace(
        sep=options.get("sep", kombu_redis.Channel.sep),
        priority_steps=options.get("priority_steps", kombu_redis.Channel.priority_steps),
        max_priority=9,
        min_priority=0,
        default_priority=0,
    )
    channel.priority = lambda n: kombu_redis.Channel.priority(channel, n)
    return channel


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("sep", ["\x06\x16", ":", "."])
def test_buckets_and_keys_are_kombus(steps: list[int], sep: str) -> None:
    options = {"sep": sep, "priority_steps": steps}
    layout = KombuLayout.from_transport_options(options)
    channel = kombu_channel(options)
    for priority in range(-3, 14):
        message = {"properties": {"priority": priority}}
        kombu_pri = kombu_virtual.Channel._get_message_priority(channel, message)
        kombu_key = kombu_redis.Channel._q_for_pri(channel, "q", kombu_pri)
        assert layout.queue_key("q", layout.bucket_of(priority)) == kombu_key
    # what kombu's BRPOP and _get read, in its order (each distinct key once)
    read = list(dict.fromkeys(kombu_redis.Channel._q_for_pri(channel, "q", s) for s in steps))
    reachable = list(layout.bucket_keys("q").values())
    assert all(key in read for key in reachable)
    written = {
        kombu_redis.Channel._q_for_pri(
            channel,
            "q",
            kombu_virtual.Channel._get_message_priority(channel, {"properties": {"priority": p}}),
        )
        for p in range(10)
    }
    assert set(reachable) == written  # every list kombu can write is read, nothing more


def test_every_kombu_transport_option_is_accepted() -> None:
    fields = set(KombuLayout().as_options())
    for name in kombu_redis.Channel.from_transport_options:
        assert name in fields or name in IGNORED_OPTIONS, name


def test_prefix_applies_to_every_key() -> None:
    layout = KombuLayout.from_transport_options(
        {"global_keyprefix": "app1:", "unacked_key": "u", "unacked_index_key": "ui"}
    )
    assert layout.queue_key("q", 3) == "app1:q\x06\x163"
    assert (layout.unacked, layout.unacked_index, layout.unacked_mutex) == (
        "app1:u",
        "app1:ui",
        "app1:unacked_mutex",
    )
    assert layout.binding_key("q") == "app1:_kombu.binding.q"
    assert layout.parse_list_key("app1:q\x06\x166") == ("q", 6)
    assert layout.parse_list_key("other:q") is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"priority_step": [0, 1]}, "unknown transport option 'priority_step'"),
        ({"sep": 3}, "sep must be a string"),
        ({"priority_steps": "0,3"}, "priority_steps must be a list of integers"),
        ({"priority_steps": [3, 0]}, "ascending"),
        ({"priority_steps": []}, "ascending"),
        ({"queue_order_strategy": "fifo"}, "queue_order_strategy"),
        ({"unacked_mutex_expire": True}, "unacked_mutex_expire"),
        ({"sep": ""}, "sep must not be empty"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        KombuLayout.from_transport_options(options)


def test_from_json_wants_an_object() -> None:
    assert KombuLayout.from_json('{"visibility_timeout": 43200}') == KombuLayout()
    with pytest.raises(LayoutError, match="JSON object"):
        KombuLayout.from_json("[1]")
    with pytest.raises(LayoutError, match="not JSON"):
        KombuLayout.from_json("{sep: ':'}")


def test_foreign_buckets_are_recognised() -> None:
    default = KombuLayout()
    assert default.foreign_bucket("q\x06\x164") is not None  # priority_steps=range(10)
    assert default.foreign_bucket("q\x06\x163") is None
    colon = KombuLayout(sep=":")
    assert colon.foreign_bucket("q\x06\x163") is not None
    assert guess_sep("short-running:3") == ":"
    assert guess_sep("short-running") is None


def test_amqp_priority_follows_the_configured_buckets() -> None:
    ten = KombuLayout(priority_steps=tuple(range(10)))
    assert [amqp_priority(p, 9, ten) for p in range(10)] == list(range(9, -1, -1))
    assert [amqp_priority(p, 9) for p in range(10)] == [9, 9, 9, 6, 6, 6, 3, 3, 3, 0]


def test_control_traffic() -> None:
    assert control_reason("celery.pidbox", "w1@host.celery.pidbox")
    assert control_reason(None, "0f3a.reply.celery.pidbox")
    assert control_reason("celeryev", "celeryev.1234")
    assert control_reason("short-running", "short-running") is None
