"""The pure parts of what workers and movers need from Celery: delayed routes, dead letters,
the green-pool guard's turn-taking, the result-backend verdict."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import pytest
from kombu.transport.native_delayed_delivery import calculate_routing_key

from packit_broker import celery_config, celery_worker, delayed_delivery
from packit_broker.queues import DELIVERY_LIMIT, QueueSpec, QueueType
from packit_broker.recovery import EVENT_DRAIN_TIMEOUT

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
QUORUM = QueueSpec("short-running", QueueType.QUORUM)
CLASSIC = QueueSpec("short-running")


def _eta(seconds: float) -> dict[str, Any]:
    return {"eta": (NOW + dt.timedelta(seconds=seconds)).isoformat()}


def test_quorum_queues_get_topic_exchanges_and_dead_letters() -> None:
    assert (QUORUM.exchange, QUORUM.exchange_type) == ("short-running.topic", "topic")
    assert (CLASSIC.exchange, CLASSIC.exchange_type) == ("short-running", "direct")
    assert QUORUM.arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "short-running.dead-letter",
    }
    assert CLASSIC.arguments == {} and CLASSIC.dead_letter_queue is None
    queue = QUORUM.kombu_queue()
    assert queue.exchange.type == "topic" and queue.queue_arguments == QUORUM.arguments


def test_celery_config_sends_countdowns_through_delayed_delivery_on_quorum() -> None:
    env = {
        "PACKIT_BROKER_URL": "amqps://u:p@rabbit.example.com:443/",
        "PACKIT_BROKER_QUEUE_TYPE": "quorum",
    }
    config = celery_config(env)
    assert config["task_default_exchange_type"] == "topic"
    assert config["broker_native_delayed_delivery_queue_type"] == "quorum"
    assert config["control_queue_exclusive"] and config["event_queue_exclusive"]
    assert all(q.exchange.type == "topic" for q in config["task_queues"])


@pytest.mark.parametrize(
    ("headers", "route"),
    [
        (_eta(120.7), ("celery_delayed_27", calculate_routing_key(120, "short-running"))),
        (_eta(0.5), None),  # due within a second: straight in, the worker holds the rest
        (_eta(-30), None),  # overdue
        ({}, None),
        ({"eta": None}, None),
        ({"eta": "not a time"}, None),
        (_eta(delayed_delivery.MAX_DELAY_SECONDS + 10), None),
    ],
)
def test_delayed_route(headers: dict[str, Any], route: tuple[str, str] | None) -> None:
    assert delayed_delivery.delayed_route(QUORUM, headers, NOW) == route
    assert delayed_delivery.delayed_route(CLASSIC, headers, NOW) is None


def test_naive_eta_is_utc() -> None:
    naive = {"eta": "2026-12-07T12:01:00"}
    assert delayed_delivery.delay_seconds(naive, NOW) == 60


def test_eta_summary_counts_what_waits_where() -> None:
    summary = delayed_delivery.EtaSummary()
    summary.add(QUORUM, 3600, routed=True)
    summary.add(CLASSIC, 3600, routed=False)
    summary.add(CLASSIC, 60, routed=False)
    summary.add(CLASSIC, 0, routed=False)
    assert summary.as_dict() == {
        "count": 3,
        "farthest_seconds": 3600,
        "through_delayed_delivery": 1,
        "held_past_consumer_timeout": 1,
    }


class _Connection:
    """Records overlapping calls: the guard must never let two run at once."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.calls: list[str] = []
        self.timeouts: list[float | None] = []

    def drain_events(self, timeout: float | None = None) -> str:
        self.calls.append("drain")
        self.timeouts.append(timeout)
        return "drained"

    def heartbeat_check(self, rate: float = 2.0) -> None:
        self.calls.append("heartbeat")


def test_guard_skips_drain_and_heartbeat_while_an_event_is_published() -> None:
    mutex = threading.Lock()
    connection = _Connection(mutex)
    celery_worker.guard_event_connection(connection, mutex)
    assert connection.drain_events(timeout=0.1) == "drained"
    with mutex:  # a greenlet publishing an event and waiting for its confirm
        with pytest.raises(TimeoutError):
            connection.drain_events(timeout=0.1)
        assert connection.heartbeat_check(2.0) is None
    connection.heartbeat_check(2.0)
    assert connection.calls == ["drain", "heartbeat"]
    assert not mutex.locked()
    celery_worker.guard_event_connection(connection, mutex)  # again: not wrapped twice
    assert connection.drain_events.__wrapped__.__name__ == "drain_events"


def test_guarded_drain_polls_instead_of_waiting() -> None:
    """Celery's loop drains the event connection with 0.1 s after every task message."""
    connection = _Connection(threading.Lock())
    celery_worker.guard_event_connection(connection, threading.Lock())
    connection.drain_events(timeout=0.1)
    connection.drain_events()
    connection.drain_events(timeout=0.0001)
    assert connection.timeouts == [EVENT_DRAIN_TIMEOUT, EVENT_DRAIN_TIMEOUT, 0.0001]


class _Dispatcher:
    """Records how events are sent; the connection is gone when `lost` is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []
        self.lost = False

    def send(self, type: str, retry: bool = False, **fields: Any) -> str:
        self.sent.append((type, retry))
        if self.lost:
            raise ConnectionResetError("cut by the router")
        return type


def test_green_events_are_sent_once_and_a_lost_heartbeat_is_dropped() -> None:
    dispatcher = _Dispatcher()
    celery_worker.publish_without_retry(dispatcher, (OSError,))
    celery_worker.publish_without_retry(dispatcher, (OSError,))  # again: not wrapped twice
    assert dispatcher.send("worker-heartbeat", retry=True, freq=2.0) == "worker-heartbeat"
    assert dispatcher.send("task-started", uuid="x") == "task-started"
    dispatcher.lost = True
    assert dispatcher.send("worker-heartbeat", retry=True, retry_policy={"max_retries": 9}) is None
    with pytest.raises(ConnectionResetError):  # a task event raises, as Celery's do
        dispatcher.send("task-succeeded", uuid="x")
    assert [retry for _, retry in dispatcher.sent] == [False] * 4


@pytest.mark.parametrize(
    ("backend", "flagged"),
    [
        ("redis://:secret-pw@redis.internal:6379/1", True),
        ("rediss://redis.internal:6380/1", True),
        ("db+postgresql://u:p@db.example.com/x", True),  # not built by celery_config()
        ("rpc://", False),
        (None, False),
        ("disabled://", False),
    ],
)
def test_unowned_result_backend_is_named_without_its_secret(
    backend: str | None, flagged: bool
) -> None:
    problem = celery_worker.unowned_backend(backend)
    assert (problem is not None) == flagged
    if problem is not None:
        assert "secret" not in problem and ":p@" not in problem
        assert "PACKIT_RESULT_BACKEND_URL" in problem


def test_backend_built_by_celery_config_is_owned() -> None:
    config = celery_config(
        {
            "PACKIT_BROKER_URL": "amqps://u:p@rabbit.example.com:443/",
            "PACKIT_RESULT_BACKEND_URL": "postgresql://u:p@db.example.com:443/packit",
        }
    )
    assert celery_worker.unowned_backend(config["result_backend"]) is None


def test_dead_letter_target() -> None:
    assert celery_worker.dead_letter_target(QUORUM.arguments) == "short-running.dead-letter"
    assert celery_worker.dead_letter_target(CLASSIC.arguments) is None
    assert celery_worker.dead_letter_target({"x-dead-letter-exchange": "dlx"}) is None
