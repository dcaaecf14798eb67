"""Start a real Celery worker process for tests (the "private cluster" side)."""

from __future__ import annotations

import contextlib
import os
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
