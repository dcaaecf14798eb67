"""The users' worker command lines keep working after idling: every pool, not only prefork.

A gevent worker configured by `celery_config()` used to stall after about a minute idle (see
`packit_broker.celery_worker`): one task received, none started, no `inspect ping` answer, deaf
to SIGTERM. This runs the users' four kinds of worker side by side through the router stand-in,
idles them for longer than two broker heartbeats, then gives each 100 tasks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from packit_broker.stack import Stack
from packit_broker.stack.processes import Process
from tests.integration.workers import (
    REPO,
    USERS_POOLS,
    send_tasks,
    start_users_worker,
    steady_load,
)

pytestmark = pytest.mark.integration

IDLE_SECONDS = 180  # the bound: well past two heartbeats (broker_heartbeat = 10 s)
TASKS = 100
RUN_DEADLINE = 60.0  # 100 trivial tasks per worker, all four workers at once, 2 cores
GRACE_SECONDS = 10  # the users' terminationGracePeriodSeconds
APP = "tests.integration.usersapp"
STEADY_RATE = 25.0  # tasks/s sent to one worker: above the 10/s Celery's green loop allowed
STEADY_COUNT = 500
STEADY_P90 = 0.5  # seconds from apply_async to the task starting, for 9 tasks in 10


def _ran(log: Path) -> Counter[str]:
    if not log.exists():
        return Counter()
    return Counter(line.split("\t")[0] for line in log.read_text().splitlines() if line)


def _wait_ready(worker: Process, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        assert worker.running, f"{worker.name} exited during start-up:\n{worker.log_tail()}"
        if "ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{worker.name} not ready:\n{worker.log_tail()}")


def _ping(env: dict[str, str], node: str) -> subprocess.CompletedProcess[str]:
    celery = str(Path(sys.executable).with_name("celery"))
    return subprocess.run(
        [celery, f"--app={APP}", "inspect", "ping", f"--destination={node}", "--timeout=5"],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_every_users_pool_runs_tasks_after_idling_and_stops_on_sigterm(
    stack: Stack, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    queues = {pool: f"{pool}-{tag}" for pool in USERS_POOLS}
    tasks_log = tmp_path / "tasks.log"
    env = {
        **stack.client_env(),
        "PACKIT_BROKER_QUEUES": ",".join(queues.values()),
        "TASKAPP_LOG": str(tasks_log),
    }
    host = os.uname().nodename
    workers: dict[str, Process] = {}
    logs = {pool: tmp_path / f"{pool}.log" for pool in USERS_POOLS}
    try:
        for pool, queue in queues.items():
            workers[pool] = start_users_worker(env, pool, [queue], logs[pool], f"{pool}-{tag}")
        deadline = time.monotonic() + 90
        for pool, worker in workers.items():
            _wait_ready(worker, logs[pool], deadline)

        time.sleep(IDLE_SECONDS)

        for pool, queue in queues.items():
            send_tasks(env, queue, TASKS, f"{pool}:")
        sent_at = time.monotonic()
        expected = {f"{pool}:{index}" for pool in USERS_POOLS for index in range(TASKS)}
        while time.monotonic() - sent_at < RUN_DEADLINE and set(_ran(tasks_log)) != expected:
            time.sleep(0.5)
        ran = _ran(tasks_log)
        missing = {
            pool: sum(f"{pool}:{i}" not in ran for i in range(TASKS)) for pool in USERS_POOLS
        }
        assert not any(missing.values()), (
            f"tasks not run within {RUN_DEADLINE:.0f}s of sending, per pool: {missing}\n"
            + "\n".join(f"--- {pool}\n{w.log_tail(15)}" for pool, w in workers.items())
        )
        assert [label for label, times in ran.items() if times > 1] == []

        for pool in USERS_POOLS:
            answer = _ping(env, f"{pool}-{tag}@{host}")
            assert answer.returncode == 0 and "pong" in answer.stdout, (
                f"{pool} worker did not answer inspect ping: {answer.stdout}{answer.stderr}"
            )

        for pool, worker in workers.items():
            assert worker.popen is not None
            started = time.monotonic()
            worker.popen.send_signal(signal.SIGTERM)  # what the kubelet does: PID 1 only
            try:
                worker.popen.wait(GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{pool} worker still running {GRACE_SECONDS}s after SIGTERM")
            assert time.monotonic() - started < GRACE_SECONDS
    finally:
        for worker in workers.values():
            worker.stop()


EVENTS_SCRIPT = """
import sys, threading, uuid
from tests.integration.usersapp import app, record
seen, sent = [], [str(uuid.uuid4())]
def succeeded(event):
    seen.append(event)
    receiver.should_stop = sent[0] == event["uuid"]
def send():
    record.apply_async(("events:0",), queue=sys.argv[1], task_id=sent[0])
def ready(connection, channel, consumers, **kwargs):
    # the receiver's queue is bound now: an event sent from here on reaches it
    threading.Thread(target=send, daemon=True).start()
with app.connection_for_read() as conn:
    receiver = app.events.Receiver(conn, handlers={"task-succeeded": succeeded})
    receiver.on_consume_ready = ready
    try:
        receiver.capture(limit=None, timeout=60, wakeup=False)
    except TimeoutError:
        pass
print(sent[0], " ".join(e["uuid"] for e in seen) or "no-event", flush=True)
"""


def test_status_and_events_work_with_transient_queues_denied(stack: Stack, tmp_path: Path) -> None:
    """`celery status` (the users' liveness probe) and task events, through the router; on
    RabbitMQ 4.x the rig refuses transient non-exclusive queues as 4.3 will
    (`packit_broker.stack.rabbitmq.FUTURE_DEFAULTS`)."""
    tag = uuid.uuid4().hex[:6]
    queue = f"events-{tag}"
    env = {**stack.client_env(), "PACKIT_BROKER_QUEUES": queue}
    log = tmp_path / "worker.log"
    worker = start_users_worker(env, "gevent", [queue], log, f"events-{tag}")
    try:
        _wait_ready(worker, log, time.monotonic() + 90)
        celery = str(Path(sys.executable).with_name("celery"))
        status = subprocess.run(
            [celery, f"--app={APP}", "status", "--timeout=5"],
            env={**os.environ, **env, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"events-{tag}@" in status.stdout
        events = subprocess.run(
            [sys.executable, "-c", EVENTS_SCRIPT, queue],
            env={**os.environ, **env, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True,
            text=True, timeout=90,
        )  # fmt: skip
        assert events.returncode == 0, events.stdout + events.stderr
        sent, *seen = events.stdout.split()
        # the task-succeeded event of the task sent
        assert sent in seen, f"{events.stdout}{events.stderr}\nworker log:\n{log.read_text()}"
    finally:
        worker.stop()


def test_worker_reports_a_result_backend_celery_config_did_not_build(
    stack: Stack, tmp_path: Path
) -> None:
    """The users' `Celery(..., backend=redis db 1)` kept after `conf.update(celery_config())`
    with PACKIT_RESULT_BACKEND_URL unset: the worker says so at start, without the password."""
    tag = uuid.uuid4().hex[:6]
    env = {
        key: value
        for key, value in stack.client_env().items()
        if not key.startswith("PACKIT_RESULT_BACKEND_")
    }
    env.update(
        PACKIT_BROKER_QUEUES=f"results-{tag}",
        USERSAPP_RESULT_BACKEND="redis://:hunter2-secret@redis.internal:6379/1",
    )
    log = tmp_path / "worker.log"
    worker = start_users_worker(env, "prefork", [f"results-{tag}"], log, f"results-{tag}")
    try:
        _wait_ready(worker, log, time.monotonic() + 90)
        text = log.read_text()
        assert "packit-broker: the app's result backend (redis://redis.internal:6379)" in text
        assert "PACKIT_RESULT_BACKEND_URL" in text
        assert "hunter2" not in text
    finally:
        worker.stop()


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_green_worker_keeps_up_with_a_steady_load(stack: Stack, tmp_path: Path, pool: str) -> None:
    """The users' green worker (16 greenlets, prefetch 1) given 25 trivial tasks a second.

    Celery's green-pool loop waited 0.1 s on the event connection after every message, so such
    a worker ran about 10 tasks a second and a steady 20/s queued up (median wait 11.8 s).
    """
    env = {**stack.broker_env(), "PACKIT_BROKER_QUEUES": f"steady-{pool}-{uuid.uuid4().hex[:6]}"}
    latencies, rate = steady_load(env, pool, tmp_path, STEADY_RATE, STEADY_COUNT)
    p50, p90 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.9)]
    print(
        f"{pool} worker, {STEADY_COUNT} tasks sent at {STEADY_RATE:g}/s: ran at {rate:.1f}/s,"
        f" latency median {p50 * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms,"
        f" max {latencies[-1] * 1000:.0f} ms"
    )
    assert p90 < STEADY_P90, f"{pool}: 9 tasks in 10 waited up to {p90:.1f} s to start"
