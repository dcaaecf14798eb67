"""A packit-like Redis backlog, made by the real producer (Celery on Redis)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from packit_broker.queues import QueueSettings

TASK = "packit_demo.process_event"
MALFORMED = b'{"body": "truncated envelope from a crashed produc'


@dataclass
class Backlog:
    task_ids: list[str] = field(default_factory=list)
    countdown_ids: list[str] = field(default_factory=list)
    unacked: int = 0


def _producer(redis_url: str, queues: Sequence[str]) -> object:
    """packit's API as it is today: Celery on Redis, same queue names."""
    from celery import Celery

    app = Celery("packit_api", broker=redis_url)
    specs = QueueSettings(names=tuple(queues)).specs
    app.conf.update(task_queues=[s.kombu_queue() for s in specs], task_default_queue=queues[0])
    return app


def kill_consumer_holding(redis_url: str, queue: str, count: int) -> None:
    """A kombu consumer takes `count` messages unacked and is SIGKILLed, like a killed worker.

    The URL (it holds the Redis password) goes in the environment, not in the child's argv."""
    script = textwrap.dedent(f"""
        import os, signal
        from kombu import Connection
        with Connection(os.environ["PACKIT_DEMO_REDIS_URL"]) as conn:
            q = conn.SimpleQueue({queue!r})
            for _ in range({count}):
                q.get(timeout=10)
            os.kill(os.getpid(), signal.{signal.SIGKILL.name})
    """)
    env = {**os.environ, "PACKIT_DEMO_REDIS_URL": redis_url}
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60, env=env)


def backdate_unacked(client: redis.Redis[bytes], seconds: float) -> None:
    for tag, score in client.zrange("unacked_index", 0, -1, withscores=True):
        client.zadd("unacked_index", {tag: score - seconds})


def make_backlog(redis_url: str, queues: Sequence[str], per_queue: int = 20) -> Backlog:
    app: object = _producer(redis_url, queues)
    send = app.send_task  # type: ignore[attr-defined]
    made = Backlog()
    killed = [send(TASK, (f"killed-worker-{i}",), queue=queues[0]).id for i in range(3)]
    kill_consumer_holding(redis_url, queues[0], len(killed))
    client: redis.Redis[bytes] = redis.Redis.from_url(redis_url)
    backdate_unacked(client, 7200)  # the worker died two hours ago
    made.unacked = int(client.hlen("unacked"))
    made.task_ids.extend(killed)
    for queue in queues:
        for i in range(per_queue):
            made.task_ids.append(send(TASK, (f"{queue}-{i}",), queue=queue).id)
    for i in range(3):
        result = send(TASK, (f"countdown-{i}",), queue=queues[-1], countdown=5, expires=3600)
        made.countdown_ids.append(result.id)
    made.task_ids.extend(made.countdown_ids)
    client.lpush(queues[1], MALFORMED)
    return made
