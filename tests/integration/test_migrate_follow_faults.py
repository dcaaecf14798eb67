"""Issue 10: the `--follow` bridge rides out RabbitMQ and router outages while real Celery
producers keep publishing into Redis: it says so loudly (a notice, packit_migrate_connected 0),
reconnects with capped backoff for as long as it takes, sends again what was unconfirmed (those
ids listed as possible duplicates), never removes from Redis what RabbitMQ did not confirm, and
still ends promptly on SIGTERM."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from packit_broker.stack import Stack
from packit_broker.stack.processes import free_port
from tests.integration.test_migrate import drain, queue_depth
from tests.integration.test_migrate_follow import Producer, metrics, poll, ran
from tests.integration.workers import REPO, celery_worker

pytestmark = [pytest.mark.integration, pytest.mark.fault]
RECONNECT_PROMPT = 10.0  # seconds: SIGTERM during an outage ends the bridge within this


class Bridge:
    """`migrate --follow --json` as a process; its events are read as they come (a full pipe
    would stall it), notices kept."""

    def __init__(self, env: dict[str, str], redis_url: str, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "packit_broker", "migrate", "--follow", "--json",
             "--metrics-port", str(self.port), *args],
            env={**os.environ, **env, "PACKIT_MIGRATE_FROM": redis_url},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.notices: list[str] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            if event.get("event") == "notice":
                self.notices.append(str(event["text"]))

    def metric(self, name: str) -> float:
        try:
            return metrics(self.port).get(name, -1.0)
        except OSError:
            return -1.0

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return code


def in_redis(redis_url: str) -> list[str]:
    """Task ids of every kombu envelope still in a Redis list (the migrator's own keys aside)."""
    client = redis.Redis.from_url(redis_url)
    ids = []
    for key in client.keys("*"):
        if client.type(key) != b"list" or key.startswith(b"packit_broker."):
            continue
        ids.extend(json.loads(raw)["headers"]["id"] for raw in client.lrange(key, 0, -1))
    return ids


def assert_nothing_lost(
    stack: Stack, redis_url: str, queues: tuple[str, ...], sent: set[str], report: Path
) -> collections.Counter[str]:
    """Every id produced is in RabbitMQ or still in Redis; every id twice in RabbitMQ, or in
    RabbitMQ and still in Redis (in flight when the connection went), is in the report's
    possible_duplicates."""
    delivered = collections.Counter(m.headers["id"] for q in queues for m in drain(stack, q))
    left = in_redis(redis_url)
    assert set(delivered) | set(left) == sent, "a task was lost (or invented)"
    twice = {task_id for task_id, n in delivered.items() if n > 1} | (set(delivered) & set(left))
    data = json.loads(report.read_text())
    assert twice <= set(data["possible_duplicates"]), "a duplicate nobody was told about"
    assert max(delivered.values()) <= 2
    client = redis.Redis.from_url(redis_url)
    assert client.get("packit_broker.inflight") is None, "in-flight journal left behind"
    return delivered


def _stop_rabbitmq(stack: Stack) -> None:
    stack.processes["rabbitmq"].stop()


def _kill_router(stack: Stack) -> None:
    stack.processes["router"].kill()


def _restart(stack: Stack) -> None:
    stack.start_rabbitmq()
    stack.start_router()


@pytest.mark.parametrize(
    ("fault", "outage"),
    [(_stop_rabbitmq, 12.0), (_kill_router, 8.0)],
    ids=["rabbitmq-stopped", "router-killed"],
)
def test_follow_rides_out_an_outage_with_producers_running(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
    fault: Callable[[Stack], None],
    outage: float,
) -> None:
    """(a) RabbitMQ stopped, (b) the router killed, for `outage` seconds while producers keep
    pushing 150 tasks/s into Redis, then started again: the same bridge carries on; 0 lost,
    every duplicate listed; then --until-idle ends it with exit 0."""
    report = tmp_path / "report.json"
    producer = Producer(redis_url, queue_names, rate=150)
    producer.start()
    bridge = Bridge(
        client_env, redis_url, "--batch-size", "40", "--until-idle", "3", "--report", str(report)
    )
    try:
        poll(lambda: sum(queue_depth(stack, q) for q in queue_names) > 150, 60, "moving")
        assert bridge.metric("packit_migrate_connected") == 1
        began = time.monotonic()
        try:
            fault(stack)
            poll(lambda: bridge.metric("packit_migrate_connected") == 0, 30, "seen as lost")
            time.sleep(max(0.0, outage - (time.monotonic() - began)))
            assert bridge.proc.poll() is None, "the bridge gave up during the outage"
        finally:
            _restart(stack)
        back = time.monotonic()
        poll(lambda: bridge.metric("packit_migrate_connected") == 1, 60, "reconnected")
        reconnected_after = time.monotonic() - back
        assert bridge.metric("packit_migrate_reconnects_total") >= 1
        time.sleep(3)  # producers still going, the bridge moving again
    finally:
        sent = {s[3] for s in producer.stop()}
    code = bridge.wait(timeout=120)
    assert code == 0, bridge.stderr
    assert any(n.startswith("LOST the connection to RabbitMQ") for n in bridge.notices)
    assert any(n.startswith("reconnected to RabbitMQ") for n in bridge.notices)
    assert "SNI" not in " ".join(bridge.notices)
    delivered = assert_nothing_lost(stack, redis_url, queue_names, sent, report)
    assert not in_redis(redis_url), "--until-idle ended with tasks still in Redis"
    print(
        f"follow through {fault.__name__}: {len(sent)} sent, {sum(delivered.values())} in"
        f" RabbitMQ ({sum(n > 1 for n in delivered.values())} twice, all listed),"
        f" reconnected {reconnected_after:.1f} s after the restart returned"
    )


def test_sigterm_during_an_outage_ends_the_bridge_promptly_with_a_report(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """A bridge reconnecting without limit still stops on SIGTERM within seconds, exit 0, its
    report listing what was in flight; nothing is lost once RabbitMQ is back."""
    report = tmp_path / "report.json"
    producer = Producer(redis_url, queue_names, rate=150)
    producer.start()
    bridge = Bridge(client_env, redis_url, "--batch-size", "40", "--report", str(report))
    try:
        poll(lambda: sum(queue_depth(stack, q) for q in queue_names) > 150, 60, "moving")
        try:
            _kill_router(stack)
            poll(lambda: bridge.metric("packit_migrate_connected") == 0, 30, "seen as lost")
            time.sleep(2)
            asked = time.monotonic()
            bridge.proc.send_signal(signal.SIGTERM)
            code = bridge.wait(timeout=30)
            took = time.monotonic() - asked
        finally:
            _restart(stack)
    finally:
        sent = {s[3] for s in producer.stop()}
    assert code == 0, bridge.stderr
    assert took < RECONNECT_PROMPT, f"SIGTERM took {took:.1f} s during an outage"
    data = json.loads(report.read_text())
    assert data["complete"] is False and sum(data["pending"].values()) > 0
    assert_nothing_lost(stack, redis_url, queue_names, sent, report)


def test_a_run_lock_lost_while_reconnecting_stops_the_bridge(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    """The run lock stays held through an outage (its own thread renews it); if another
    migrator takes it meanwhile, the bridge stops before its next attempt (exit 1, [redis]),
    instead of moving under a second migrator once RabbitMQ is back."""
    bridge = Bridge(client_env, redis_url, "--batch-size", "40")
    client = redis.Redis.from_url(redis_url)
    try:
        poll(lambda: bridge.metric("packit_migrate_connected") == 1, 60, "connected")
        try:
            _kill_router(stack)
            poll(lambda: bridge.metric("packit_migrate_connected") == 0, 30, "seen as lost")
            time.sleep(3)
            holder = json.loads(client.get("packit_broker.lock") or b"{}")
            assert holder.get("owner"), "the lock was not held during the outage"
            client.set("packit_broker.lock", json.dumps({"owner": "another:1:x", "client_id": 0}))
            code = bridge.wait(timeout=60)
        finally:
            _restart(stack)
    finally:
        if bridge.proc.poll() is None:
            bridge.proc.kill()
    assert code == 1, bridge.stderr
    assert "[redis] the run lock 'packit_broker.lock' was lost" in bridge.stderr
    assert json.loads(client.get("packit_broker.lock") or b"{}")["owner"] == "another:1:x"


# -- (c) a steady 200+ tasks/s for a minute, real producers and real workers ------------------

RATE = 80.0  # tasks/s per queue and producer process: 240/s in all
SECONDS = 60.0


def test_follow_carries_200_tasks_a_second_for_a_minute_exactly_once_in_priority_order(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Three real Celery producers (one process per queue, priorities 0/3/6/9) push 240
    tasks/s into Redis for 60 s; the bridge carries them; real Celery workers on RabbitMQ run
    two queues live, every 10th of their tasks with a countdown: each task runs exactly once,
    FIFO within a priority. The third queue has no consumer until the bridge ended
    (--until-idle, exit 0), so its whole minute waits in RabbitMQ, where the priority order is
    observable: it is then consumed in delivery order, as a one-at-a-time worker takes it
    (a Celery solo worker on this backlog ran it in that order but stalled 3.3 s at a time,
    74 s in all, too slow for CI) - highest priority first, FIFO within one, each once."""
    env = {**client_env, "PACKIT_BROKER_MAX_PRIORITY": "9"}
    live, late = list(queue_names[:2]), queue_names[2]
    report = tmp_path / "report.json"
    bridge = Bridge(env, redis_url, "--until-idle", "5", "--report", str(report))
    log = tmp_path / "ran.tsv"
    # No result backend: a PostgreSQL write per task would cap a worker at ~10 tasks/s here.
    worker_env = {
        **{k: v for k, v in env.items() if not k.startswith("PACKIT_RESULT_BACKEND_")},
        "TASKAPP_LOG": str(log),
    }
    outputs = [tmp_path / f"sent-{q}.tsv" for q in queue_names]
    with contextlib.ExitStack() as workers:
        for queue in live:
            workers.enter_context(celery_worker(worker_env, [queue], tmp_path / f"{queue}.log"))
        began = time.monotonic()
        producers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.integration.celery_producer",
                    q,
                    str(RATE),
                    str(SECONDS),
                    str(out),
                    "0" if q == late else "10",  # every 10th with a countdown
                ],
                env={**os.environ, "PRODUCER_REDIS_URL": redis_url, "PYTHONPATH": str(REPO)},
                cwd=REPO,
            )
            for q, out in zip(queue_names, outputs, strict=True)
        ]
        for producer in producers:
            assert producer.wait(timeout=SECONDS + 60) == 0
        produced_for = time.monotonic() - began
        assert bridge.wait(timeout=120) == 0, bridge.stderr
        sent = [line.split("\t") for out in outputs for line in out.read_text().splitlines()]
        live_sent = [s for s in sent if s[0] != late]
        rows = ran(log, len(live_sent))
    waiting = drain(stack, late)
    rate = len(sent) / produced_for
    assert rate >= 200, f"the producers managed only {rate:.0f} tasks/s"
    data = json.loads(report.read_text())
    assert data["possible_duplicates"] == [] and data["quarantined"] == 0
    assert data["complete"] is True and sum(data["migrated"].values()) == len(sent)
    ids = [row[1] for row in rows]
    assert len(ids) == len(set(ids)), "a task ran twice"
    assert set(ids) == {s[3] for s in live_sent}, "a task was lost"
    priority = {s[2]: int(s[1]) for s in sent}
    delayed = {s[2] for s in sent if s[4] == "1"}
    for queue in live:
        order = [r[0] for r in rows if r[2] == queue and r[0] not in delayed]
        for p in set(priority.values()):
            wanted = [s[2] for s in sent if s[0] == queue and s[1] == str(p) and s[4] == "0"]
            got = [label for label in order if priority[label] == p]
            assert got == wanted, f"{queue}: priority {p} not first in, first out"
    late_ids = [m.headers["id"] for m in waiting]
    assert sorted(late_ids) == sorted(s[3] for s in sent if s[0] == late), "lost or twice"
    labels = [json.loads(m.body)[0][0] for m in waiting]
    expected = sorted(
        (s for s in sent if s[0] == late), key=lambda s: int(s[1])
    )  # Redis priority 0 = AMQP 9 first; stable: FIFO within a priority
    assert labels == [s[2] for s in expected], "the waiting queue is out of priority order"
    assert [m.properties["priority"] for m in waiting] == [9 - int(s[1]) for s in expected]
    print(
        f"follow at {rate:.0f} tasks/s for {produced_for:.0f} s: {len(sent)} tasks, each"
        f" once ({len(rows)} run by workers, {len(waiting)} in priority order in RabbitMQ);"
        " bridge exit 0 after --until-idle"
    )
