"""Start a real Celery worker process for tests (the "private cluster" side)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from packit_broker.stack.processes import Process

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def celery_worker(
    env: Mapping[str, str], queues: list[str], log: Path, app: str = "tests.integration.taskapp"
) -> Iterator[Process]:
    """A `celery worker` (solo pool, one task at a time) on `queues`, configured by env only."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-P",
        "solo",
        "-Q",
        ",".join(queues),
        "-l",
        "warning",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"worker-{os.getpid()}-{queues[0]}@%h",
    ]
    proc = Process("celery-worker", argv, log, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


#: The users' worker command line (packit-service `files/run_worker.sh`), one per StatefulSet:
#: `--pool=gevent` whenever the concurrency is above one.
USERS_POOLS = {"gevent": 16, "eventlet": 16, "prefork": 1, "threads": 4}


def users_worker_argv(app: str, pool: str, queues: list[str], name: str) -> list[str]:
    """`celery --app=APP worker --concurrency=C --pool=POOL --prefetch-multiplier=1 --queues=Q`."""
    celery = str(Path(sys.executable).with_name("celery"))
    return [
        celery,
        f"--app={app}",
        "worker",
        f"--concurrency={USERS_POOLS[pool]}",
        f"--pool={pool}",
        "--prefetch-multiplier=1",
        f"--queues={','.join(queues)}",
        # Not on the users' line: a node name per worker (their pods differ by host name) and
        # INFO logs for the test's diagnostics.
        f"--hostname={name}@%h",
        "--loglevel=INFO",
    ]


def start_users_worker(
    env: Mapping[str, str],
    pool: str,
    queues: list[str],
    log: Path,
    name: str,
    app: str = "tests.integration.usersapp",
) -> Process:
    """Start (not wait for) one worker run the way the users run theirs."""
    argv = users_worker_argv(app, pool, queues, name)
    proc = Process(f"celery-{pool}", argv, log, env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO)
    proc.start()
    return proc


def send_tasks(
    env: Mapping[str, str], queue: str, count: int, label: str, countdown: float = 0
) -> None:
    """Send `count` usersapp.record tasks from a producer process of their own (see
    tests/integration/users_producer.py), configured by `env` like the users' API."""
    sent = subprocess.run(
        [sys.executable, "-m", "tests.integration.users_producer", queue, str(count), label,
         str(countdown)],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120,
        capture_output=True, text=True,
    )  # fmt: skip
    assert sent.returncode == 0, f"producer failed:\n{sent.stdout}{sent.stderr}"


def _runs(log: Path) -> dict[str, tuple[float, float]]:
    """usersapp.record's log: label -> (when it ran, when it was sent)."""
    if not log.exists():
        return {}
    found = {}
    for line in log.read_text().splitlines():
        label, ran, sent = line.split("\t")
        if sent:
            found[label] = (float(ran), float(sent))
    return found


def steady_load(
    env: Mapping[str, str], pool: str, folder: Path, rate: float, count: int
) -> tuple[list[float], float]:
    """One users' worker of `pool` given `count` tasks at `rate` a second through `env`'s broker.

    Returns each task's latency (sent to started, seconds, sorted) and the tasks/s from the
    first send to the last run. The worker is started, warmed up with one task, and stopped.
    """
    from celery import Celery

    from packit_broker import celery_config

    queue = env["PACKIT_BROKER_QUEUES"]
    log = folder / f"{pool}.tasks"
    worker = start_users_worker(
        {**env, "TASKAPP_LOG": str(log)}, pool, [queue], folder / f"{pool}.log", f"steady-{pool}"
    )
    producer = Celery("steady-producer")
    producer.conf.update(celery_config(dict(env)))
    labels = [f"s{i}" for i in range(count)]
    try:
        _send_and_wait(producer, log, ["warm-up"], 0.0, 90)
        began = time.time()
        _send_and_wait(producer, log, labels, 1 / rate, 60 + count / rate)
    finally:
        worker.stop()
    runs = _runs(log)
    last = max(runs[label][0] for label in labels)
    return sorted(runs[label][0] - runs[label][1] for label in labels), count / (last - began)


def _send_and_wait(
    producer: Any, log: Path, labels: list[str], pause: float, timeout: float
) -> None:
    for label in labels:
        producer.send_task("usersapp.record", args=[label, time.time()])
        time.sleep(pause)
    deadline = time.monotonic() + timeout
    while not set(labels) <= _runs(log).keys():
        assert time.monotonic() < deadline, f"not all {len(labels)} tasks ran in {timeout:.0f} s"
        time.sleep(0.2)
