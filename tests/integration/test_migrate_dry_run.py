"""`--dry-run` exits as the real run would start, so `dry-run && migrate` is a safe runbook: 3
where the run would refuse, 1 where RabbitMQ cannot be reached or a queue exists with other
arguments (it dials RabbitMQ unless --offline), 0 otherwise. It changes nothing."""

from __future__ import annotations

import threading
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from packit_broker.stack import Stack
from tests.integration import backlog
from tests.integration.test_migrate import queue_depth, run_migrate

pytestmark = pytest.mark.integration


def test_dry_run_exits_3_where_the_real_run_refuses(
    client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    queue = queue_names[0]
    app = backlog.producer(redis_url, queue_names)
    backlog.send(app, queue, "waiting")
    held = threading.Event()

    def consumer() -> None:  # a Redis worker still consuming
        client = redis.Redis.from_url(redis_url, socket_timeout=30)
        held.set()
        client.blpop([f"nothing-{queue}"], timeout=10)

    thread = threading.Thread(target=consumer, daemon=True)
    thread.start()
    held.wait(5)
    dry = run_migrate(client_env, "--from", redis_url, "--dry-run")
    real = run_migrate(client_env, "--from", redis_url)
    thread.join()
    assert dry.returncode == real.returncode == 3, dry.stderr + real.stderr
    assert "refused" in dry.stderr
    assert redis.Redis.from_url(redis_url).llen(queue) == 1


def test_dry_run_dials_rabbitmq_unless_offline(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    backlog.send(backlog.producer(redis_url, queue_names), queue_names[0], "waiting")
    url = urlsplit(client_env["PACKIT_BROKER_URL"])
    wrong = url._replace(netloc=f"{url.username}:not-the-password@{url.hostname}:{url.port}")
    env = {**client_env, "PACKIT_BROKER_URL": urlunsplit(wrong)}
    dry = run_migrate(env, "--from", redis_url, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "RabbitMQ" in dry.stderr and "not-the-password" not in dry.stdout + dry.stderr
    offline = run_migrate(env, "--from", redis_url, "--dry-run", "--offline")
    assert offline.returncode == 0, offline.stderr
    good = run_migrate(client_env, "--from", redis_url, "--dry-run")
    assert good.returncode == 0, good.stderr
    assert all(queue_depth(stack, q) == -1 for q in queue_names), "a dry run declared a queue"


def test_dry_run_finds_a_queue_declared_with_other_arguments(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    queue = queue_names[0]
    backlog.send(backlog.producer(redis_url, queue_names), queue, "waiting")
    with stack.amqp_connection() as connection:
        connection.channel().queue_declare(
            queue, durable=True, auto_delete=False, arguments={"x-max-priority": 5}
        )
    dry = run_migrate(client_env, "--from", redis_url, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "[queue-arguments]" in dry.stderr and "x-max-priority" in dry.stderr
