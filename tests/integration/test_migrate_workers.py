"""Issue 9: migrate and the processes around it - real Celery workers on Redis (killed or still
running), a second migrator, a crashed one, a writer racing the run."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from packit_broker.kombu_layout import KombuLayout
from packit_broker.migrate.redis_source import (
    POSSIBLE_DUPLICATES,
    LockHeld,
    RedisSource,
    RunLock,
    UnackedEntry,
)
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process, wait_until
from tests.integration import backlog
from tests.integration.test_migrate import drain, queue_depth, run_migrate
from tests.integration.workers import REPO, celery_worker

pytestmark = pytest.mark.integration


def node_name(queues: tuple[str, ...]) -> str:
    """The node name `celery_worker` gives the RabbitMQ worker for `queues`."""
    return f"worker-{os.getpid()}-{queues[0]}@{socket.gethostname()}"


@contextlib.contextmanager
def redis_worker(
    redis_url: str,
    queues: tuple[str, ...],
    log: Path,
    *,
    sleep: float = 0,
) -> Iterator[Process]:
    """A real Celery worker still on Redis (prefork, one process, remote control on)."""
    argv = [
        sys.executable, "-m", "celery", "-A", "tests.integration.redis_taskapp", "worker",
        "-c", "1", "-Q", ",".join(queues), "-l", "info", "-n", node_name(queues),
    ]  # fmt: skip
    env = {
        "REDIS_TASKAPP_URL": redis_url,
        "REDIS_TASKAPP_QUEUES": ",".join(queues),
        "REDIS_TASKAPP_SLEEP": str(sleep),
        "PYTHONPATH": str(REPO),
    }
    proc = Process("redis-worker", argv, log, env=env, cwd=REPO)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def start_migrate(env: dict[str, str], redis_url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "packit_broker", "migrate", "--from", redis_url, "--json", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_progress(proc: subprocess.Popen[str], at_least: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "progress" and event["moved"] >= at_least:
            return
    pytest.fail(f"migrate ended early: {proc.stderr.read() if proc.stderr else ''}")


def fill(
    redis_url: str, queue: str, count: int, key: str | None = None, **send: object
) -> list[str]:
    app = backlog.producer(redis_url, (queue,))
    client = redis.Redis.from_url(redis_url)
    first = backlog.send(app, queue, f"{queue}:first", **send)
    template = client.lindex(key or queue, 0)
    assert template is not None
    labels = [f"{queue}:{i}" for i in range(count - 1)]
    return [first, *backlog.clone_many(client, key or queue, template, labels)]


def test_killed_redis_worker_pidbox_is_skipped_and_the_node_starts_on_rabbitmq(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    client = redis.Redis.from_url(redis_url)
    pidbox = f"{node_name(queue_names)}.celery.pidbox"
    with redis_worker(redis_url, queue_names, tmp_path / "redis-worker.log") as worker:
        wait_until(
            lambda: any(
                pidbox.encode() in m for m in client.smembers("_kombu.binding.celery.pidbox")
            ),
            worker,
            90,
            "Celery worker on Redis",
        )
        worker.kill()  # SIGKILL: the pidbox binding stays behind
    task = backlog.send(backlog.producer(redis_url, queue_names), queue_names[0], "x:after")
    dry = run_migrate(client_env, "--from", redis_url, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    plan = json.loads(dry.stdout)
    assert pidbox in {s["name"] for s in plan["skipped"]}
    assert pidbox not in {q["name"] for q in plan["queues"]}
    done = run_migrate(client_env, "--from", redis_url, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert {"name": pidbox, "reason": "Celery remote-control (pidbox) queue of a worker"} in report[
        "skipped"
    ]
    assert pidbox not in report["migrated"]
    assert queue_depth(stack, pidbox) == -1

    log = tmp_path / "ran.tsv"
    env = {**client_env, "TASKAPP_LOG": str(log)}
    with celery_worker(env, list(queue_names), tmp_path / "w.log") as rabbit_worker:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (log.exists() and log.read_text()):
            assert rabbit_worker.running, rabbit_worker.log_tail()
            time.sleep(0.3)
        assert rabbit_worker.running, rabbit_worker.log_tail()
    assert log.read_text().split("\t")[1] == task
    assert "ResourceLocked" not in (tmp_path / "w.log").read_text()


def test_worker_busy_with_full_prefetch_is_seen(
    client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str, tmp_path: Path
) -> None:
    """A real prefork worker running a long task delivered 'long ago': refused, named."""
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names)
    log = tmp_path / "redis-worker.log"
    with redis_worker(redis_url, queue_names, log, sleep=120) as worker:
        backlog.send(app, queue_names[0], "x:running")
        wait_until(lambda: client.hlen("unacked") == 1, worker, 90, "Celery worker on Redis")
        backlog.send(app, queue_names[0], "x:waiting")
        backlog.backdate_unacked(client, 7200)
        refused = run_migrate(client_env, "--from", redis_url)
        assert worker.running
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "consuming from Redis" in refused.stderr
    assert client.llen(queue_names[0]) == 1


POLLING_CONSUMER = """
import sys, time
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    queue = conn.SimpleQueue(sys.argv[2])
    message = queue.get(block=False)  # RPOP, not BRPOP: a polling consumer
    print("holding", flush=True)
    time.sleep(120)
"""


def test_polling_consumer_that_is_not_blocked_is_seen(
    client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    """A live kombu consumer that took a message with RPOP and is working on it: not blocked
    in any pop, its delivery backdated - its recent consumer traffic gives it away."""
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names)
    for label in ("x:held", "x:waiting"):
        backlog.send(app, queue_names[0], label)
    consumer = subprocess.Popen(
        [sys.executable, "-c", POLLING_CONSUMER, redis_url, queue_names[0]],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert consumer.stdout is not None and consumer.stdout.readline() == "holding\n"
        backlog.backdate_unacked(client, 7200)
        before = client.hgetall("unacked")
        refused = run_migrate(client_env, "--from", redis_url)
    finally:
        consumer.kill()
        consumer.wait()
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "consuming from Redis" in refused.stderr
    assert client.hgetall("unacked") == before and client.llen(queue_names[0]) == 1


def test_second_migrator_is_refused_naming_the_first(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    queue = queue_names[0]
    expected = fill(redis_url, queue, 20_000)
    first = start_migrate(client_env, redis_url, "--batch-size", "200")
    try:
        wait_for_progress(first, 200)
        first.send_signal(signal.SIGSTOP)  # still running (and connected), however fast it is
        try:
            second = run_migrate(client_env, "--from", redis_url)
        finally:
            first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 3, second.stdout + second.stderr
    assert "another migration" in second.stderr
    assert f"{socket.gethostname()}:{first.pid}:" in second.stderr
    assert first.returncode == 0, stderr
    delivered = collections.Counter(
        m.properties["application_headers"]["id"] for m in drain(stack, queue)
    )
    assert set(delivered) == set(expected) and max(delivered.values()) == 1


def test_crashed_migrator_lock_is_taken_over_and_its_batch_reported(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    queue = queue_names[0]
    expected = fill(redis_url, queue, 10_000)
    crashed = start_migrate(client_env, redis_url, "--batch-size", "200")
    wait_for_progress(crashed, 2000)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(10)
    client = redis.Redis.from_url(redis_url)
    assert client.exists("packit_broker.lock")  # not released: the run was killed
    report_file = tmp_path / "r.json"
    rerun = run_migrate(client_env, "--from", redis_url, "--report", str(report_file))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = json.loads(report_file.read_text())
    assert report["taken_over_from"].startswith(f"{socket.gethostname()}:{crashed.pid}:")
    delivered = collections.Counter(
        m.properties["application_headers"]["id"] for m in drain(stack, queue)
    )
    assert set(delivered) == set(expected)
    duplicates = {i for i, n in delivered.items() if n > 1}
    assert duplicates <= set(report["possible_duplicates"])
    assert not client.exists("packit_broker.lock")


def test_leftovers_are_found_and_named(
    client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    """A writer puts a task back into a bucket the run has already emptied: exit 5, named."""
    queue = queue_names[0]
    client = redis.Redis.from_url(redis_url)
    bucket9 = f"{queue}\x06\x169"
    fill(redis_url, queue, 5000, key=bucket9, priority=9)
    fill(redis_url, queue, 1)
    late = client.lindex(queue, 0)
    assert late is not None
    initial = client.llen(bucket9)

    def put_back_late() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and client.llen(bucket9) == initial:
            time.sleep(0.002)
        client.lpush(queue, late)

    writer = threading.Thread(target=put_back_late)
    writer.start()
    done = run_migrate(client_env, "--from", redis_url, "--batch-size", "200", "--json")
    writer.join()
    assert done.returncode == 5, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["remaining"] == {queue: 1} and report["complete"] is False
    assert client.llen(queue) == 1


def test_unacked_mutex_held_by_a_worker_is_respected(
    client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names)
    backlog.send(app, queue_names[0], "x:held")
    backlog.kill_consumer_holding(redis_url, queue_names[0], 1)
    backlog.backdate_unacked(client, 7200)
    before = client.hgetall("unacked")
    with client.lock("unacked_mutex", timeout=120):  # as kombu's restore sweep holds it
        refused = run_migrate(client_env, "--from", redis_url, "--force")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "unacked_mutex" in refused.stderr
    assert client.hgetall("unacked") == before


def test_unacked_removed_only_while_unchanged(redis_url: str) -> None:
    client: redis.Redis[bytes] = redis.Redis.from_url(redis_url)
    source = RedisSource(client, 0, KombuLayout())
    client.hset("unacked", mapping={"same": b'["a"]', "changed": b'["b"]'})
    client.zadd("unacked_index", {"same": 1.0, "changed": 1.0})
    read = [UnackedEntry("same", b'["a"]', 1.0), UnackedEntry("changed", b'["b"]', 1.0)]
    client.hset("unacked", "changed", b'["b", "restored and redelivered"]')
    gone = UnackedEntry("gone", b'["c"]', 1.0)
    assert sorted(source.remove_unacked([*read, gone], [])) == ["changed", "gone"]
    assert client.hgetall("unacked") == {b"changed": b'["b", "restored and redelivered"]'}


def test_reported_ids_are_forgotten_only_while_the_list_starts_with_them(redis_url: str) -> None:
    """A report's ids leave Redis only if nobody changed the list's head since: a run that
    began after ours released its lock may have reported (and trimmed) them already."""
    source = RedisSource.from_url(redis_url, KombuLayout())
    source.client.delete(source.own(POSSIBLE_DUPLICATES))
    source.add_possible_duplicates(["a", "b", "c"])
    assert source.forget_reported(POSSIBLE_DUPLICATES, ["a", "b"])
    assert source.possible_duplicates() == ["c"]
    assert not source.forget_reported(POSSIBLE_DUPLICATES, ["a"])  # changed under us: kept
    assert not source.forget_reported(POSSIBLE_DUPLICATES, ["c", "d"])  # fewer than reported
    assert source.possible_duplicates() == ["c"]
    assert source.forget_reported(POSSIBLE_DUPLICATES, [])


def test_run_lock_is_renewed_refused_and_taken_over_only_when_dead(redis_url: str) -> None:
    source = RedisSource.from_url(redis_url, KombuLayout())
    first = RunLock(source, ttl=1.0)
    assert first.acquire() is None
    first.start()
    time.sleep(2.5)  # more than twice the expiry: only renewal keeps it
    with pytest.raises(LockHeld, match=first.owner):
        RunLock(source, ttl=1.0).acquire()
    first.release()
    assert not source.client.exists("packit_broker.lock")

    crashed = RunLock(source, ttl=60.0)
    crashed.acquire()
    crashed.close()  # its process died: the connection is gone, the key is not
    successor = RunLock(source, ttl=60.0)
    assert successor.acquire() == crashed.owner
    successor.release()

    silent = RunLock(source, ttl=0.5)
    silent.acquire()  # connected but never renewed: expires
    time.sleep(1.0)
    late = RunLock(source, ttl=60.0)
    assert late.acquire() is None
    late.release()
    silent.close()
