"""Issue 18: a one-shot run in a pipe (a pod log) says how far it is, regularly, and ends with
one line of totals."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest
import redis

from packit_broker.migrate.progress import PLAIN_INTERVAL
from packit_broker.stack import Stack
from tests.integration import backlog
from tests.integration.test_migrate import queue_depth

pytestmark = pytest.mark.integration

MESSAGES = 200_000
#: Scheduling on the shared 2-core machine: a line may arrive this much late (or early).
SLACK = 1.5

LINE = re.compile(r"migrate: (\d+)/(\d+) moved \((\d+\.\d)%\), ([\d.]+) msg/s(?:, ETA (\S+))?$")
SUMMARY = re.compile(r"migrate: done, (\d+) moved in (\S+) \(([\d.]+) msg/s\); report: (.+)$")


def collect(stream: IO[str], into: list[tuple[float, str]]) -> threading.Thread:
    """Each line as it arrives, with its arrival time (the clock the test judges by)."""

    def read() -> None:
        for line in stream:
            into.append((time.monotonic(), line.rstrip("\n")))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_piped_run_prints_progress_every_interval_and_a_summary(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    queue = queue_names[0]
    client = redis.Redis.from_url(redis_url)
    backlog.send(backlog.producer(redis_url, queue_names), queue, "0")
    template = client.lindex(queue, 0)
    assert template is not None
    chunk = 20_000
    for start in range(1, MESSAGES, chunk):
        labels = [str(i) for i in range(start, min(start + chunk, MESSAGES))]
        backlog.clone_many(client, queue, template, labels)
    assert client.llen(queue) == MESSAGES

    report_file = tmp_path / "report.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "packit_broker", "migrate", "--report", str(report_file)],
        env={**os.environ, **client_env, "PACKIT_MIGRATE_FROM": redis_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out: list[tuple[float, str]] = []
    err: list[tuple[float, str]] = []
    readers = [collect(proc.stdout, out), collect(proc.stderr, err)]
    try:
        code = proc.wait(timeout=540)
    finally:
        if proc.poll() is None:
            proc.kill()
        for reader in readers:
            reader.join(10)
    text = "\n".join(line for _, line in out + err)
    try:
        assert code == 0, text

        progress = [(at, LINE.match(line)) for at, line in err if line.startswith("migrate: ")]
        assert all(match is not None for _, match in progress), text
        seen = [(at, m) for at, m in progress if m is not None]
        assert len(seen) >= 3, f"a run this long shows its progress more than once:\n{text}"
        moved = [int(m[1]) for _, m in seen]
        assert moved == sorted(moved) and moved[-1] == MESSAGES
        assert {int(m[2]) for _, m in seen} == {MESSAGES}
        assert any(m[5] for _, m in seen[:-1]), "no ETA while moving"
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(seen)]
        # At least every PLAIN_INTERVAL, at most every PLAIN_INTERVAL: the last one is the end.
        assert max(gaps) <= PLAIN_INTERVAL + SLACK, gaps
        assert min(gaps[:-1]) >= PLAIN_INTERVAL - SLACK, gaps

        last = SUMMARY.match(out[-1][1])
        assert last is not None, text
        assert int(last[1]) == MESSAGES
        assert float(last[3]) > 0
        assert Path(last[4]) == report_file
        report = json.loads(report_file.read_text())
        assert report["migrated"][queue] == sum(report["migrated"].values()) == MESSAGES
        assert MESSAGES / report["seconds"] == pytest.approx(float(last[3]), rel=0.01)
        assert queue_depth(stack, queue) == MESSAGES
        print(f"migrated {MESSAGES} in {last[2]} at {last[3]} msg/s; gaps {gaps}")
    finally:
        with stack.amqp_connection() as conn:  # 200,000 messages less for the shared broker
            conn.channel().queue_delete(queue)
