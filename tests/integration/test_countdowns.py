"""Countdown tasks never block a worker, on either queue type, sent by Celery or moved by migrate.

The users retry with countdowns of up to an hour and run `--prefetch-multiplier=1`: a worker that
holds a not-yet-due task in its only prefetch slot runs nothing else until it is due. On quorum
queues Celery avoids that only through native delayed delivery (topic exchanges, see
`packit_broker.queues.QueueSpec`); `migrate` routes moved ETA tasks the same way
(`packit_broker.delayed_delivery`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import amqp
import pytest

from packit_broker import delayed_delivery
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process
from tests.integration import backlog
from tests.integration.workers import REPO, send_tasks, start_users_worker

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _purge_delayed_delivery(stack: Stack) -> Iterator[None]:
    """Empty kombu's delayed-delivery queues afterwards: the hour-long countdowns these tests
    leave would otherwise come due an hour later, and a rollback test on the shared broker
    rightly counts them as tasks not moved."""
    yield
    with stack.amqp_connection() as conn:
        for queue in delayed_delivery.LEVEL_QUEUES:
            channel = conn.channel()
            try:
                channel.queue_purge(queue)
            except amqp.exceptions.NotFound:
                continue
            channel.close()


#: Classic queues run with the prefetch semantics kombu reports for RabbitMQ 4.x on every version
#: (tests/integration/usersapp.py): without `packit_broker.celery_worker.ChannelPrefetch` 0 of
#: 20 immediate tasks ran within 30 s behind countdowns held by a one-slot worker (RabbitMQ 4.0,
#: CI's Debian 13 root, and 3.10 with that verdict forced).
QUEUE_TYPES = ["classic", "quorum"]

START_BOUND = 5.0  # the bound: an immediate task starts within 5 s
LATE_BOUND = 5.0  # a countdown task runs within 5 s after it is due (never before)
HOUR = 3600


def _env(stack: Stack, queue: str, queue_type: str, log: Path) -> dict[str, str]:
    return {
        **stack.client_env(),
        "PACKIT_BROKER_QUEUES": queue,
        "PACKIT_BROKER_QUEUE_TYPE": queue_type,
        "TASKAPP_LOG": str(log),
        "USERSAPP_KOMBU_4X_QOS": "1",
    }


def _runs(log: Path) -> dict[str, tuple[float, float | None]]:
    """label -> (ran at, due at) from the users' app log; a label seen twice fails the test."""
    runs: dict[str, tuple[float, float | None]] = {}
    if not log.exists():
        return runs
    for line in log.read_text().splitlines():
        label, ran, due = line.split("\t")
        assert label not in runs, f"{label} ran twice"
        runs[label] = (float(ran), float(due) if due else None)
    return runs


def _wait_for(log: Path, labels: set[str], seconds: float) -> dict[str, tuple[float, float | None]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not labels <= set(_runs(log)):
        time.sleep(0.2)
    return _runs(log)


def _ready(worker: Process, log: Path) -> float:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert worker.running, f"worker exited:\n{worker.log_tail()}"
        if "ready." in log.read_text(errors="replace"):
            return time.time()
        time.sleep(0.2)
    raise AssertionError(f"worker not ready:\n{worker.log_tail()}")


def _assert_on_time(runs: dict[str, tuple[float, float | None]], labels: set[str]) -> None:
    for label in sorted(labels):
        assert label in runs, f"{label} (due) never ran"
        ran, due = runs[label]
        assert due is not None
        assert ran >= due, f"{label} ran {due - ran:.2f}s early"
        assert ran <= due + LATE_BOUND, f"{label} ran {ran - due:.1f}s after it was due"


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_countdown_tasks_do_not_block_immediate_ones(
    stack: Stack, tmp_path: Path, queue_type: str
) -> None:
    """The issue's case on the users' prefork line (one slot), one node."""
    queue = f"countdown-{queue_type}-{uuid.uuid4().hex[:6]}"
    countdowns_do_not_block(_env(stack, queue, queue_type, tmp_path / "tasks.log"), tmp_path)


def countdowns_do_not_block(env: dict[str, str], tmp_path: Path) -> None:
    """Countdowns of an hour and of 15 s queued first, then 20 immediate tasks, then a task
    retrying six times with countdowns, to the users' prefork worker (one slot) on
    PACKIT_BROKER_QUEUES; TASKAPP_LOG collects the runs. Shared with the cluster tests."""
    queue, log = env["PACKIT_BROKER_QUEUES"], Path(env["TASKAPP_LOG"])
    worker = start_users_worker(env, "prefork", [queue], tmp_path / "worker.log", queue)
    try:
        _ready(worker, tmp_path / "worker.log")
        send_tasks(env, queue, 3, "hour:", HOUR)
        send_tasks(env, queue, 3, "soon:", 15)
        send_tasks(env, queue, 20, "now:", 0)
        now = {f"now:{i}" for i in range(20)}
        runs = _wait_for(log, now, 30)
        late = {
            label: round(runs[label][0] - (runs[label][1] or 0), 1) for label in now & set(runs)
        }
        assert set(late) == now, f"immediate tasks not run: {sorted(now - set(late))}"
        assert max(late.values()) <= START_BOUND, f"seconds from send to start: {late}"

        retry = subprocess.run(
            [sys.executable, "-c", "from tests.integration.usersapp import retrying;"
             f"retrying.apply_async(('retry', 6), queue={queue!r})"],
            env={**os.environ, **env, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=60,
            capture_output=True, text=True,
        )  # fmt: skip
        assert retry.returncode == 0, retry.stderr
        soon = {f"soon:{i}" for i in range(3)}
        attempts = {f"retry#{n}" for n in range(7)}
        runs = _wait_for(log, soon | attempts, 60)
        _assert_on_time(runs, soon)
        assert attempts <= set(runs), (
            f"retries with countdowns stopped after {sorted(set(runs) & attempts)}:\n"
            f"{worker.log_tail(20)}"
        )
        assert not {label for label in runs if label.startswith("hour:")}, "an hour ran early"
    finally:
        worker.stop()


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_migrated_countdown_tasks_run_on_time_without_blocking(
    stack: Stack, tmp_path: Path, queue_type: str, redis_url: str
) -> None:
    """A Redis backlog with countdowns (an hour, 40 s) and immediate tasks, moved by `migrate`:
    the immediate ones start within 5 s of the worker, the 40 s ones at their time, the plan
    and the report count the ETA tasks and how they wait."""
    queue = f"migrated-{queue_type}-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "tasks.log"
    env = _env(stack, queue, queue_type, log)
    app = backlog.producer(redis_url, [queue])
    for label, countdown, count in (("hour:", HOUR, 3), ("soon:", 40, 3), ("now:", 0, 20)):
        for i in range(count):
            due = time.time() + countdown
            app.send_task(
                "usersapp.record", (f"{label}{i}", due), queue=queue, countdown=countdown or None
            )
    app.close()

    dry = subprocess.run(
        [sys.executable, "-m", "packit_broker", "migrate", "--from", redis_url, "--dry-run",
         "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stdout + dry.stderr
    planned = json.loads(dry.stdout.strip().splitlines()[-1])["eta_tasks"]
    assert planned["count"] == 6 and HOUR - 60 < planned["farthest_seconds"] <= HOUR
    assert planned["through_delayed_delivery"] == (6 if queue_type == "quorum" else 0)

    done = subprocess.run(
        [sys.executable, "-m", "packit_broker", "migrate", "--from", redis_url, "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["complete"] is True and report["migrated"] == {queue: 26}
    etas = report["eta_tasks"]
    assert etas["count"] == 6 and HOUR - 60 < etas["farthest_seconds"] <= HOUR
    assert etas["through_delayed_delivery"] == (6 if queue_type == "quorum" else 0)
    assert etas["held_past_consumer_timeout"] == (0 if queue_type == "quorum" else 3)

    worker = start_users_worker(env, "prefork", [queue], tmp_path / "worker.log", queue)
    try:
        ready_at = _ready(worker, tmp_path / "worker.log")
        now = {f"now:{i}" for i in range(20)}
        runs = _wait_for(log, now, 30)
        assert now <= set(runs), f"immediate tasks not run: {sorted(now - set(runs))}"
        slowest = max(runs[label][0] for label in now) - ready_at
        assert slowest <= START_BOUND, f"last immediate task started {slowest:.1f}s after ready"
        soon = {f"soon:{i}" for i in range(3)}
        _assert_on_time(_wait_for(log, soon, 60), soon)
        assert not {label for label in _runs(log) if label.startswith("hour:")}
    finally:
        worker.stop()


def test_bridge_routes_countdown_tasks_through_delayed_delivery(
    stack: Stack, tmp_path: Path, redis_url: str
) -> None:
    """`migrate --follow` with a quorum queue and the users' prefork worker already running:
    countdown tasks still pushed to Redis reach the worker when due, immediate ones at once."""
    queue = f"bridged-quorum-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "tasks.log"
    env = _env(stack, queue, "quorum", log)
    app = backlog.producer(redis_url, [queue])

    def send(label: str, countdown: float, count: int) -> None:
        for i in range(count):
            due = time.time() + countdown
            app.send_task(
                "usersapp.record", (f"{label}{i}", due), queue=queue, countdown=countdown or None
            )

    send("hour:", HOUR, 3)  # the list exists before the bridge plans
    worker = start_users_worker(env, "prefork", [queue], tmp_path / "worker.log", queue)
    report = tmp_path / "report.json"
    bridge = subprocess.Popen(
        [sys.executable, "-m", "packit_broker", "migrate", "--follow", "--json",
         "--report", str(report)],
        env={**os.environ, **env, "PACKIT_MIGRATE_FROM": redis_url},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _ready(worker, tmp_path / "worker.log")
        send("soon:", 20, 3)
        send("now:", 0, 20)
        app.close()
        now = {f"now:{i}" for i in range(20)}
        runs = _wait_for(log, now, 30)
        late = {label: runs[label][0] - (runs[label][1] or 0) for label in now & set(runs)}
        assert set(late) == now, f"immediate tasks not run: {sorted(now - set(late))}"
        assert max(late.values()) <= START_BOUND, f"seconds from send to start: {late}"
        soon = {f"soon:{i}" for i in range(3)}
        _assert_on_time(_wait_for(log, soon, 60), soon)
        bridge.send_signal(signal.SIGTERM)
        _, stderr = bridge.communicate(timeout=60)
        assert bridge.returncode == 0, stderr
        etas = json.loads(report.read_text())["eta_tasks"]
        assert etas["count"] == etas["through_delayed_delivery"] == 6
        assert not {label for label in _runs(log) if label.startswith("hour:")}
    finally:
        if bridge.poll() is None:
            bridge.kill()
        worker.stop()
