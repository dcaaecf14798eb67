"""Benchmark the rollback (`migrate --from amqps://... --to redis://...`) against a plain mover.

Run by hand: `.venv/bin/python -m bench.bench_rollback [--messages 30000] [--repeat 3]`.
One machine, one run, one local stack; both movers consume over TLS through the router
stand-in. The reference is a plain consume + LPUSH loop with manual acks (prefetch = the
same window, one pipelined LPUSH per batch, one multiple-ack after Redis answered), without
the journal, the run lock, the per-message decoding and checks. Rounds alternate, medians
are compared (the machine's speed drifts between runs).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import amqp
import redis

from packit_broker.codecs import from_redis, to_amqp
from packit_broker.queues import QueueSpec
from packit_broker.stack import Stack
from tests.integration import backlog

QUEUE = "bench-rollback"
WINDOW = 1000
SETTLE_SECONDS = 2


def fill(stack: Stack, count: int) -> None:
    """`count` copies of a real Celery task message (fresh ids) in the RabbitMQ queue."""
    url = stack.redis_url(3)
    client = redis.Redis.from_url(url)
    client.flushdb()
    backlog.send(backlog.producer(url, ["template"]), "template", "template")
    raw = client.rpop("template")
    assert raw is not None
    template = from_redis(raw)
    spec = QueueSpec(QUEUE)
    with stack.amqp_connection() as conn:
        channel = conn.channel()
        spec.declare(channel)
        channel.queue_purge(QUEUE)
        for i in range(count):
            task_id = str(uuid.uuid4())
            message = to_amqp(
                type(template)(
                    body=json.dumps([[f"m{i}"], {}, {}]).encode(),
                    headers={**template.headers, "id": task_id, "root_id": task_id},
                    properties={**template.properties, "correlation_id": task_id},
                    content_type=template.content_type,
                    content_encoding=template.content_encoding,
                ),
                queue=QUEUE,
                max_priority=None,
            )
            channel.basic_publish(
                amqp.Message(message.body, **message.properties), "", message.routing_key
            )
        while int(channel.queue_declare(QUEUE, passive=True).message_count) < count:
            time.sleep(0.1)


def _envelope(message: amqp.Message) -> bytes:
    """The kombu envelope for a consumed message (what a Redis worker needs)."""
    props = message.properties
    return json.dumps(
        {
            "body": base64.b64encode(message.body).decode(),
            "content-encoding": props.get("content_encoding"),
            "content-type": props.get("content_type"),
            "headers": props.get("application_headers") or {},
            "properties": {
                "correlation_id": props.get("correlation_id"),
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": QUEUE},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    ).encode()


def reference_mover(stack: Stack, count: int) -> None:
    """Consume with prefetch WINDOW, LPUSH each half window in one command, then one
    multiple-ack; stop after `count` (it knows the size: no empty-queue detection)."""
    client = redis.Redis.from_url(stack.redis_url(4))
    with stack.amqp_connection() as conn:
        channel = conn.channel()
        channel.auto_decode = False
        channel.basic_qos(0, WINDOW, False)
        batch: list[Any] = []
        channel.basic_consume(QUEUE, callback=batch.append)
        moved = 0
        while moved < count:
            while len(batch) < min(WINDOW // 2, count - moved):
                conn.drain_events(timeout=10)
            taken, batch[:] = list(batch), []
            client.lpush(QUEUE, *(_envelope(m) for m in taken))
            channel.basic_ack(taken[-1].delivery_tag, multiple=True)
            moved += len(taken)


def run_ours(stack: Stack) -> tuple[float, float]:
    """(wall seconds, seconds the run reports) of the real command."""
    broker = stack.broker_env()
    env = {
        **os.environ,
        **broker,
        "PACKIT_MIGRATE_FROM": broker["PACKIT_BROKER_URL"],
        "PACKIT_MIGRATE_TO": stack.redis_url(5),
        "PACKIT_BROKER_QUEUES": QUEUE,
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "packit_broker", "migrate", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    final = json.loads(done.stdout.splitlines()[-1]) if done.stdout else {}
    if done.returncode != 0 or final.get("event") != "done":
        raise SystemExit(f"rollback failed: {done.stderr}")
    return wall, float(final["seconds"])


def settle(stack: Stack) -> None:
    for db in (4, 5):
        redis.Redis.from_url(stack.redis_url(db)).flushdb()
    time.sleep(SETTLE_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds")
    args = parser.parse_args()
    size = args.messages
    ref_runs: list[float] = []
    our_runs: list[tuple[float, float]] = []
    began = time.perf_counter()
    with Stack() as stack:
        for _ in range(args.repeat):
            fill(stack, size)
            start = time.perf_counter()
            reference_mover(stack, size)
            ref_runs.append(time.perf_counter() - start)
            settle(stack)
            fill(stack, size)
            our_runs.append(run_ours(stack))
            settle(stack)
            print(
                f"round: reference {size / ref_runs[-1]:.0f} msg/s,"
                f" rollback {size / our_runs[-1][1]:.0f} msg/s",
                file=sys.stderr,
                flush=True,
            )
    ref = statistics.median(ref_runs)
    wall, moving = sorted(our_runs, key=lambda run: run[1])[len(our_runs) // 2]
    print(f"\n{'mover':<44} {'messages':>9} {'wall s':>7} {'msg/s':>7} {'x ref':>6}")
    print(f"{'reference consume+LPUSH (TLS via router)':<44} {size:>9} {ref:>7.1f}"
          f" {size / ref:>7.0f} {1.0:>6.2f}")  # fmt: skip
    print(f"{'packit-broker migrate rollback':<44} {size:>9} {wall:>7.1f}"
          f" {size / moving:>7.0f} {ref / moving:>6.2f}")  # fmt: skip
    print(
        f"medians of {args.repeat} alternating rounds; rollback msg/s excludes its process"
        f" start (wall s includes it); bench took {time.perf_counter() - began:.0f}s"
    )


if __name__ == "__main__":
    main()
