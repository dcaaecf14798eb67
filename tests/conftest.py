"""Shared fixtures: one real stack per test session (see packit_broker.stack)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from packit_broker.stack import Stack, StackError


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The servers every integration test uses; if they cannot start, one error ends the run.

    Reported once, with what is wrong and the fix, instead of once per test (under CI or not:
    a suite that silently skips half of itself proves nothing).
    """
    try:
        running = Stack().start()
    except StackError as exc:
        pytest.exit(f"the test stack could not start, no integration test can run:\n{exc}", 3)
    except Exception as exc:  # a bug in the rig: still one error, with its type
        pytest.exit(f"the test stack could not start ({type(exc).__name__}): {exc}", 3)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def queue_names() -> tuple[str, str, str]:
    """Per-test queue names, so tests share one broker without seeing each other's messages."""
    tag = uuid.uuid4().hex[:8]
    return (f"short-running-{tag}", f"long-running-{tag}", f"rate-limited-{tag}")


@pytest.fixture
def client_env(stack: Stack, queue_names: tuple[str, str, str]) -> dict[str, str]:
    return {**stack.client_env(), "PACKIT_BROKER_QUEUES": ",".join(queue_names)}


_next_db = iter(range(1, 10_000))


@pytest.fixture
def redis_url(stack: Stack) -> Iterator[str]:
    """A Redis database of this test's own (1..15), flushed afterwards."""
    import redis

    url = stack.redis_url(1 + next(_next_db) % 15)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
