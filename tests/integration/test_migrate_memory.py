"""Memory follows a byte budget, not only a message count: 400 tasks of 1 MiB move with the
migrator's peak RSS under the bound docs/migrate.md states (and the bridge template's limit)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from packit_broker.stack import Stack
from tests.integration import backlog
from tests.integration.test_migrate import queue_depth

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
#: The bound docs/migrate.md states for any body size (the bridge template's limit: 512 Mi).
PEAK_RSS_BOUND = 256 * MIB


def _peak_rss(pid: int, peak: list[int], done: threading.Event) -> None:
    """VmHWM of `pid` (its peak resident set), read until it exits."""
    while not done.is_set():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.05)


def test_400_tasks_of_1_mib_move_within_the_memory_bound(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    queue = queue_names[0]
    client = redis.Redis.from_url(redis_url)
    backlog.send(backlog.producer(redis_url, queue_names), queue, "template")
    template = client.lindex(queue, 0)
    assert template is not None
    for _ in range(0, 400, 50):  # 50 at a time: the test's own memory stays small
        backlog.clone_many(client, queue, template, ["x" * MIB] * 50)
    run = subprocess.Popen(
        [sys.executable, "-m", "packit_broker", "migrate", "--from", redis_url, "--json"],
        env={**os.environ, **client_env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, done = [0], threading.Event()
    watcher = threading.Thread(target=_peak_rss, args=(run.pid, peak, done), daemon=True)
    watcher.start()
    _, stderr = run.communicate(timeout=600)
    done.set()
    watcher.join()
    assert run.returncode == 0, stderr
    assert queue_depth(stack, queue) == 401
    print(f"forward, 400 x 1 MiB: peak RSS {peak[0] / MIB:.0f} MiB")  # shown with -s
    assert 0 < peak[0] < PEAK_RSS_BOUND, f"peak RSS {peak[0] / MIB:.0f} MiB"
