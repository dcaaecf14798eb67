"""Issue 10: `migrate --follow`, the bridge that carries what producers still push into Redis
while the workers already consume RabbitMQ - real Celery producers, real Celery workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from packit_broker.stack import Stack
from packit_broker.stack.processes import free_port
from tests.integration import backlog
from tests.integration.test_migrate import drain, queue_depth
from tests.integration.workers import celery_worker

pytestmark = pytest.mark.integration

PRIORITIES = (0, 3, 6, 9)  # one per bucket of the producer's priority_steps


def start_bridge(env: dict[str, str], redis_url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "packit_broker", "migrate", "--follow", "--json", *args],
        env={**os.environ, **env, "PACKIT_MIGRATE_FROM": redis_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def events(proc: subprocess.Popen[str]) -> Iterator[dict[str, object]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield json.loads(line)


def wait_for_notice(proc: subprocess.Popen[str], word: str) -> str:
    for event in events(proc):
        if event.get("event") == "notice" and word in str(event["text"]):
            return str(event["text"])
    raise AssertionError(f"the bridge ended without a {word!r} notice: {proc.stderr}")


def poll(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"not {what} within {timeout}s"
        time.sleep(0.2)


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("packit_migrate_"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


class Producer(threading.Thread):
    """A real Celery producer on Redis, publishing `rate` tasks/s round-robin over the queues
    and the priority buckets until stopped; remembers what it sent, in order."""

    def __init__(self, redis_url: str, queues: tuple[str, ...], rate: float) -> None:
        super().__init__(daemon=True)
        self.app = backlog.producer(redis_url, queues)
        self.queues = queues
        self.rate = rate
        self.sent: list[tuple[str, int, str, str]] = []  # queue, priority, label, id
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        started = time.monotonic()
        while not self.halt.is_set():
            queue = self.queues[n % len(self.queues)]
            priority = PRIORITIES[(n // len(self.queues)) % len(PRIORITIES)]
            label = f"{queue}:f{n}"
            task_id = backlog.send(self.app, queue, label, priority=priority)
            self.sent.append((queue, priority, label, task_id))
            n += 1
            delay = started + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stop(self) -> list[tuple[str, int, str, str]]:
        self.halt.set()
        self.join()
        return self.sent


def ran(log: Path, count: int, timeout: float = 120) -> list[list[str]]:
    """The workers' log rows once `count` tasks ran, or once none ran for `timeout` s: a
    loaded machine's workers may trail the producers by minutes, a lost task never runs."""
    seen, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < timeout:
        rows = len(log.read_text().splitlines()) if log.exists() else 0
        if rows >= count:
            break
        if rows != seen:
            seen, quiet_since = rows, time.monotonic()
        time.sleep(0.3)
    time.sleep(1)  # a duplicate would show up now
    return [line.split("\t") for line in log.read_text().splitlines()]


def test_follow_pauses_for_a_redis_consumer_then_bridges_live_producers_to_workers(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    # An old Redis worker is still blocked in BRPOP: the bridge starts, but pauses, loudly.
    old_worker = redis.Redis.from_url(redis_url)
    blocked = threading.Thread(target=lambda: old_worker.brpop(["old-worker-queue"], timeout=0))
    blocked.start()
    port = free_port()
    report = tmp_path / "report.json"
    bridge = start_bridge(
        client_env, redis_url, "--until-idle", "4", "--metrics-port", str(port),
        "--report", str(report),
    )  # fmt: skip
    try:
        notice = wait_for_notice(bridge, "PAUSED")
        assert "brpop" in notice and "stop it" in notice
        # A backlog in every bucket, newest priority first, lands while paused: nothing moves.
        app = backlog.producer(redis_url, queue_names)
        backlog_ids = {}
        for priority in reversed(PRIORITIES):
            for q in queue_names:
                for i in range(3):
                    label = f"{q}:p{priority}-{i}"
                    backlog_ids[label] = backlog.send(app, q, label, priority=priority)
        time.sleep(1.5)
        assert all(queue_depth(stack, q) == 0 for q in queue_names)
        assert metrics(port)["packit_migrate_paused"] == 1
        redis.Redis.from_url(redis_url).lpush("old-worker-queue", "bye")  # the old worker exits
        blocked.join()
        old_worker.close()  # its connection goes with it
        wait_for_notice(bridge, "resumed")
        poll(lambda: sum(queue_depth(stack, q) for q in queue_names) == 36, 60, "moved")
        # Workers on RabbitMQ now, producers still on Redis: the bridge carries every task.
        log = tmp_path / "ran.tsv"
        worker_env = {**client_env, "TASKAPP_LOG": str(log)}
        with celery_worker(worker_env, list(queue_names), tmp_path / "worker.log"):
            producer = Producer(redis_url, queue_names, rate=60)
            producer.start()
            time.sleep(4)
            sent = producer.stop()
            bridge.wait(timeout=120)
            rows = ran(log, 36 + len(sent))
    finally:
        if bridge.poll() is None:
            bridge.kill()
    _, stderr = bridge.communicate()
    assert bridge.returncode == 0, stderr
    labels = [r[0] for r in rows]
    ids = [r[1] for r in rows]
    assert len(ids) == len(set(ids)), "a task ran twice"
    assert set(ids) == set(backlog_ids.values()) | {s[3] for s in sent}, "a task was lost"
    for q in queue_names:
        # The backlog ran in priority order (bucket by bucket, oldest first in each) ...
        first = [label.split(":")[1] for label in labels if label.startswith(f"{q}:p")]
        assert first == [f"p{p}-{i}" for p in PRIORITIES for i in range(3)]
        # ... and what the bridge carried live kept the producer's order within a bucket.
        for priority in PRIORITIES:
            wanted = [s[2] for s in sent if s[0] == q and s[1] == priority]
            assert [lbl for lbl in labels if lbl in set(wanted)] == wanted
    data = json.loads(report.read_text())
    assert sum(data["migrated"].values()) == 36 + len(sent)
    assert data["possible_duplicates"] == [] and data["quarantined"] == 0
    assert data["remaining"] == {} and data["complete"] is True


def test_sigterm_finishes_the_batch_in_flight_and_exits_0(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    port = free_port()
    report = tmp_path / "report.json"
    bridge = start_bridge(
        client_env, redis_url, "--metrics-port", str(port), "--report", str(report),
        "--batch-size", "20",
    )  # fmt: skip
    producer = Producer(redis_url, queue_names, rate=150)
    producer.start()
    try:
        poll(lambda: sum(queue_depth(stack, q) for q in queue_names) > 100, 60, "moving")
        seen = metrics(port)
        assert seen["packit_migrate_seconds_since_last_move"] < 5
        confirmed = [v for k, v in seen.items() if k.startswith("packit_migrate_batch_latency_")]
        assert confirmed and max(confirmed) > 0
        assert sum(v for k, v in seen.items() if k.startswith("packit_migrate_moved_total")) > 0
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(timeout=60)
    finally:
        sent = producer.stop()
        if bridge.poll() is None:
            bridge.kill()
    _, stderr = bridge.communicate()
    assert bridge.returncode == 0, stderr
    data = json.loads(report.read_text())
    delivered = [m.headers["id"] for q in queue_names for m in drain(stack, q)]
    client = redis.Redis.from_url(redis_url)
    left = [
        json.loads(raw)["headers"]["id"]
        for key in client.keys("*")
        if client.type(key) == b"list"
        for raw in client.lrange(key, 0, -1)
    ]
    assert len(delivered) == len(set(delivered)) == sum(data["migrated"].values())
    assert not set(delivered) & set(left), "moved but still in Redis"
    assert set(delivered) | set(left) == {s[3] for s in sent}, "a task was lost"
    assert data["possible_duplicates"] == []
    assert client.get("packit_broker.inflight") is None, "in-flight marker left behind"


def test_sigkill_of_the_bridge_loses_nothing_and_lists_every_duplicate(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    producer = Producer(redis_url, queue_names, rate=200)
    producer.start()
    first = start_bridge(client_env, redis_url, "--batch-size", "40")
    try:
        poll(lambda: sum(queue_depth(stack, q) for q in queue_names) > 150, 60, "moving")
        first.send_signal(signal.SIGKILL)  # mid-batch, most likely
        first.wait(timeout=30)
    finally:
        sent = producer.stop()
        if first.poll() is None:
            first.kill()
    first.communicate()
    report = tmp_path / "report.json"
    second = start_bridge(client_env, redis_url, "--until-idle", "2", "--report", str(report))
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    delivered = [m.headers["id"] for q in queue_names for m in drain(stack, q)]
    assert set(delivered) == {s[3] for s in sent}, "a task was lost"
    twice = {i for i in delivered if delivered.count(i) > 1}
    listed = set(json.loads(report.read_text())["possible_duplicates"])
    assert twice <= listed, "a duplicate nobody was told about"
    assert len(listed) <= 40, "more listed than the confirm window can hold"


def test_sigterm_while_paused_moves_nothing_and_reports_what_is_left(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    app = backlog.producer(redis_url, queue_names)
    for i in range(3):
        backlog.send(app, queue_names[0], f"waiting-{i}")
    old_worker = redis.Redis.from_url(redis_url)
    blocked = threading.Thread(target=lambda: old_worker.brpop(["old-worker-queue"], timeout=0))
    blocked.start()
    report = tmp_path / "report.json"
    bridge = start_bridge(client_env, redis_url, "--report", str(report))
    try:
        wait_for_notice(bridge, "PAUSED")
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(timeout=60)
    finally:
        if bridge.poll() is None:
            bridge.kill()
        redis.Redis.from_url(redis_url).lpush("old-worker-queue", "bye")
        blocked.join()
    _, stderr = bridge.communicate()
    assert bridge.returncode == 0, stderr
    assert queue_depth(stack, queue_names[0]) == 0
    data = json.loads(report.read_text())
    assert data["remaining"] == {queue_names[0]: 3} and data["complete"] is False
