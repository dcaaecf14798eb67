"""Start a real Celery worker process for tests (the "private cluster" side)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

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
