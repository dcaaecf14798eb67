"""Ctrl-C, SIGTERM and SIGHUP end a run cleanly: the batches in flight are finished, the report
is written, and the exit code says whether work is left (never 0 for an unfinished one-shot
run). A second signal ends it at once."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from packit_broker.stack import Stack
from tests.integration.test_migrate_faults import (
    fill,
    finish_and_verify,
    start_migrate,
    wait_for_progress,
)

pytestmark = pytest.mark.integration

EXIT_INCOMPLETE = 5


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_a_signal_mid_run_writes_the_report_and_exits_incomplete(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    expected = fill(redis_url, queue_names, 4000)
    report_file = tmp_path / "report.json"
    run = start_migrate(client_env, redis_url, "--report", str(report_file))
    wait_for_progress(run, 500)
    run.send_signal(signum)
    try:
        stdout, stderr = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        run.kill()
        raise
    assert run.returncode == EXIT_INCOMPLETE, stderr
    assert signum.name in stdout + stderr  # said, not silent
    report = json.loads(report_file.read_text())
    assert report["complete"] is False and sum(report["remaining"].values()) > 0
    left = sum(redis.Redis.from_url(redis_url).llen(q) for q in queue_names)
    assert sum(report["remaining"].values()) == left
    finish_and_verify(stack, client_env, redis_url, queue_names, expected, 0, tmp_path)
