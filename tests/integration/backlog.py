"""A packit-like Redis backlog made by the real producers: Celery and kombu on Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery

from packit_broker.demo.backlog import backdate_unacked, kill_consumer_holding

__all__ = [
    "MALFORMED",
    "backdate_index",
    "backdate_unacked",
    "clone_many",
    "kill_consumer_holding",
    "kill_consumer_with_options",
    "producer",
    "send",
]

MALFORMED: dict[str, bytes] = {
    "not JSON": b"\x80\x81 definitely not json",
    "missing fields": json.dumps({"headers": {"task": "x", "id": "1"}}).encode(),
    "bad base64": json.dumps(
        {
            "body": "!!!not-base64!!!",
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"task": "taskapp.record", "id": "bad-b64"},
            "properties": {"body_encoding": "base64", "delivery_tag": "t1"},
        }
    ).encode(),
    "unknown body_encoding": json.dumps(
        {
            "body": "abc",
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"task": "taskapp.record", "id": "bad-enc"},
            "properties": {"body_encoding": "rot13", "delivery_tag": "t2"},
        }
    ).encode(),
    "protocol 1": json.dumps(
        {
            "body": "eyJ0YXNrIjogInRhc2thcHAucmVjb3JkIiwgImlkIjogInAxIiwgImFyZ3MiOiBbXX0=",
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {},
            "properties": {"body_encoding": "base64", "delivery_tag": "t3"},
        }
    ).encode(),
}


def producer(
    redis_url: str, queues: Sequence[str], transport_options: dict[str, Any] | None = None
) -> Celery:
    """The users' current producer: Celery on Redis with their three queues (and, if given,
    the app's `broker_transport_options`)."""
    from kombu import Exchange, Queue

    app = Celery("producer", broker=redis_url)
    app.conf.update(
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in queues],
        task_default_queue=queues[0],
        broker_transport_options=transport_options or {"priority_steps": [0, 3, 6, 9]},
    )
    return app


def kill_consumer_with_options(
    redis_url: str, queue: str, count: int, transport_options: dict[str, Any]
) -> None:
    """Like `kill_consumer_holding`, by a kombu consumer configured with `transport_options`."""
    script = textwrap.dedent(f"""
        import os, signal
        from kombu import Connection
        with Connection({redis_url!r}, transport_options={transport_options!r}) as conn:
            q = conn.SimpleQueue({queue!r})
            for _ in range({count}):
                q.get(timeout=10)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60, env=dict(os.environ))


def backdate_index(client: redis.Redis, key: str, seconds: float) -> None:
    """Make every delivery in the unacked index `key` look `seconds` older."""
    for tag, score in client.zrange(key, 0, -1, withscores=True):
        client.zadd(key, {tag: score - seconds})


def send(app: Celery, queue: str, label: str, **options: object) -> str:
    result = app.send_task("taskapp.record", (label,), queue=queue, **options)
    return str(result.id)


def clone_many(
    client: redis.Redis, queue: str, template: bytes, labels: Sequence[str]
) -> list[str]:
    """Fast bulk backlog: copies of one real envelope with fresh ids and bodies."""
    import base64

    base = json.loads(template)
    ids = []
    pipe = client.pipeline(transaction=False)
    for label in labels:
        env = json.loads(json.dumps(base))
        task_id = str(uuid.uuid4())
        env["headers"]["id"] = env["headers"]["root_id"] = task_id
        env["properties"]["correlation_id"] = task_id
        env["properties"]["delivery_tag"] = str(uuid.uuid4())
        body = json.dumps(
            [[label], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
        )
        env["body"] = base64.b64encode(body.encode()).decode()
        pipe.lpush(queue, json.dumps(env))
        ids.append(task_id)
    pipe.execute()
    return ids
