"""Benchmark `packit-broker migrate --follow`: latency from a producer's LPUSH into Redis to
the message's arrival at a RabbitMQ consumer, at a steady producer rate.

Run by hand: `.venv/bin/python -m bench.bench_follow [--rate 500] [--seconds 60]`. A real
Celery producer makes one envelope; the producer loop LPUSHes copies of it (fresh ids, the
push time in a header) at `--rate` per second, round-robin over three queues; the bridge runs
as the real command over TLS through the router stand-in; a consumer on RabbitMQ notes each
arrival. Arrival is after RabbitMQ routed the message, so this bounds LPUSH -> confirm from
above (the bridge removes from Redis only after the confirm). Issue 10's target: p99 < 500 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

import redis

from packit_broker.stack import Stack
from tests.integration import backlog

QUEUES = ("bench-follow-a", "bench-follow-b", "bench-follow-c")


def produce(client: redis.Redis[bytes], template: bytes, rate: float, seconds: float) -> int:
    """LPUSH at a steady `rate`, each envelope stamped with its push time."""
    base = json.loads(template)
    sent = 0
    started = time.monotonic()
    while (now := time.monotonic()) - started < seconds:
        env = json.loads(json.dumps(base))
        env["headers"]["id"] = str(uuid.uuid4())
        env["headers"]["pushed_at"] = time.time()
        client.lpush(QUEUES[sent % len(QUEUES)], json.dumps(env))
        sent += 1
        delay = started + sent / rate - now
        if delay > 0:
            time.sleep(delay)
    return sent


def consume(stack: Stack, expected: threading.Event, latencies: list[float]) -> None:
    with stack.amqp_connection() as conn:
        channel = conn.channel()

        def on_message(message: object) -> None:
            headers = message.headers  # type: ignore[attr-defined]
            latencies.append(time.time() - float(headers["pushed_at"]))

        for queue in QUEUES:
            channel.queue_declare(queue, passive=True)  # as the bridge declared it
            channel.basic_consume(queue, callback=on_message, no_ack=True)
        while not expected.is_set():
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    with Stack() as stack:
        url = stack.redis_url(4)
        client = redis.Redis.from_url(url)
        client.flushdb()
        app = backlog.producer(url, list(QUEUES))
        backlog.send(app, QUEUES[0], "template")
        template = client.rpop(QUEUES[0])
        assert template is not None
        app.close()
        env = {
            **os.environ,
            **stack.broker_env(),
            "PACKIT_BROKER_QUEUES": ",".join(QUEUES),
            "PACKIT_MIGRATE_FROM": url,
        }
        bridge = subprocess.Popen(
            [sys.executable, "-m", "packit_broker", "migrate", "--follow", "--json"],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        time.sleep(5)  # the bridge's start (it declares the queues), not measured
        latencies: list[float] = []
        done = threading.Event()
        consumer = threading.Thread(target=consume, args=(stack, done, latencies))
        consumer.start()
        time.sleep(1)
        sent = produce(client, template, args.rate, args.seconds)
        deadline = time.monotonic() + 30
        while len(latencies) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        bridge.send_signal(signal.SIGTERM)
        code = bridge.wait(timeout=60)
        done.set()
        consumer.join()
    ms = sorted(x * 1000 for x in latencies)
    p50 = statistics.median(ms)
    p99 = ms[int(len(ms) * 0.99) - 1]
    print(
        f"follow at {args.rate:g} tasks/s for {args.seconds:g}s: sent {sent}, arrived {len(ms)},"
        f" LPUSH -> RabbitMQ arrival p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {ms[-1]:.0f} ms;"
        f" bridge exit {code} on SIGTERM"
    )


if __name__ == "__main__":
    main()
