"""Start a real Celery worker process for tests (the "private cluster" side)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def celery_worker(
    env: Mapping[str, str], queues: list[str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A `celery worker` (solo pool, one task at a time) on `queues`, configured by env only."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.integration.taskapp",
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
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
