"""Pure: the client timeouts that bound recovery from a node loss or a network cut."""

from __future__ import annotations

from packit_broker import celery_config
from packit_broker.recovery import (
    CONNECT_TIMEOUT,
    HEARTBEAT,
    MAX_PUBLISH_BLOCK,
    READ_TIMEOUT,
    RECONNECT_FIRST_PAUSE,
    RECONNECT_MAX_PAUSE,
    RECONNECT_WINDOW,
    Backoff,
    recovery_settings,
)

ENV = {"PACKIT_BROKER_URL": "amqps://u:p@amqp.apps.example.com:443/"}


def test_celery_config_carries_the_recovery_timeouts() -> None:
    config = celery_config(ENV)
    assert config["broker_heartbeat"] == HEARTBEAT == 10
    assert config["broker_connection_timeout"] == CONNECT_TIMEOUT
    options = config["broker_transport_options"]
    assert options["confirm_publish"] is True  # kept, not replaced
    assert options["read_timeout"] == READ_TIMEOUT
    assert config["task_publish_retry_policy"]["max_retries"] == 3


def test_a_heartbeat_chosen_by_the_user_is_kept() -> None:
    assert celery_config({**ENV, "PACKIT_BROKER_HEARTBEAT": "30"})["broker_heartbeat"] == 30
    assert celery_config({**ENV, "PACKIT_BROKER_HEARTBEAT": "0"})["broker_heartbeat"] == 0


def test_transport_options_set_elsewhere_win() -> None:
    merged = recovery_settings({"broker_transport_options": {"read_timeout": 3}})
    assert merged["broker_transport_options"] == {"read_timeout": 3, "write_timeout": 5.0}


def test_publish_block_bound() -> None:
    """4 attempts of connect (5) + write (5) + confirm (10) and 1 + 2 + 2 s between them."""
    assert MAX_PUBLISH_BLOCK == 4 * 20 + 5


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pauses(backoff: Backoff, clock: Clock, limit: int = 20) -> list[float]:
    taken = []
    while len(taken) < limit and (pause := backoff.next_pause()) is not None:
        taken.append(pause)
        clock.now += pause + 0.5  # the attempt itself takes a moment
    return taken


def test_reconnect_backoff_doubles_to_the_cap_within_the_window() -> None:
    clock = Clock()
    taken = pauses(Backoff(RECONNECT_WINDOW, clock=clock), clock)
    assert taken[:6] == [1, 2, 4, 8, 15, 15]
    assert max(taken) == RECONNECT_MAX_PAUSE
    assert RECONNECT_WINDOW - 1 <= sum(taken) + 0.5 * len(taken) <= RECONNECT_WINDOW + 1
    assert taken[0] == RECONNECT_FIRST_PAUSE


def test_reconnect_backoff_without_a_window_never_gives_up() -> None:
    clock = Clock()
    taken = pauses(Backoff(None, clock=clock), clock, limit=2000)
    assert len(taken) == 2000 and taken[-1] == RECONNECT_MAX_PAUSE
