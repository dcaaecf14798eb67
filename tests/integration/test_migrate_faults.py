"""Issue: migrate. Faults at any instant lose nothing; a plain rerun finishes the job."""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from packit_broker.stack import Stack
from tests.integration import backlog
from tests.integration.test_migrate import drain, run_migrate

pytestmark = [pytest.mark.integration, pytest.mark.fault]
BATCH = 200


def fill(redis_url: str, queues: tuple[str, ...], per_queue: int) -> set[str]:
    app = backlog.producer(redis_url, queues)
    client = redis.Redis.from_url(redis_url)
    ids: set[str] = set()
    for queue in queues:
        ids.add(backlog.send(app, queue, f"{queue}:first"))
        template = client.lindex(queue, 0)
        assert template is not None
        ids.update(
            backlog.clone_many(
                client, queue, template, [f"{queue}:{i}" for i in range(per_queue - 1)]
            )
        )
    return ids


def start_migrate(env: dict[str, str], redis_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "packit_broker",
            "migrate",
            "--from",
            redis_url,
            "--batch-size",
            str(BATCH),
            "--json",
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_progress(proc: subprocess.Popen[str], at_least: int) -> None:
    """Block until the run reports `at_least` moved messages (so a fault lands mid-run)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "progress" and event["moved"] >= at_least:
            return
    pytest.fail(
        f"migrate ended before moving {at_least}: {proc.stderr.read() if proc.stderr else ''}"
    )


def finish_and_verify(
    stack: Stack,
    env: dict[str, str],
    redis_url: str,
    queues: tuple[str, ...],
    expected: set[str],
    faults: int,
    tmp_path: Path,
) -> dict[str, object]:
    report_file = tmp_path / "final.json"
    final = run_migrate(env, "--from", redis_url, "--report", str(report_file))
    assert final.returncode == 0, final.stdout + final.stderr
    report = json.loads(report_file.read_text())
    client = redis.Redis.from_url(redis_url)
    for queue in queues:
        assert client.llen(queue) == 0
    delivered = collections.Counter(
        m.properties["application_headers"]["id"] for q in queues for m in drain(stack, q)
    )
    assert set(delivered) == expected, "lost or invented messages"
    duplicates = {task_id for task_id, n in delivered.items() if n > 1}
    assert duplicates <= set(report["possible_duplicates"]), "an unreported duplicate"
    assert len(duplicates) <= BATCH * faults, "more duplicates than one confirm window per fault"
    assert all(n <= 2 for n in delivered.values())
    return report


def test_sigkill_at_random_points(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    expected = fill(redis_url, queue_names, 4000)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = 3
    for round_ in range(kills):
        proc = start_migrate(client_env, redis_url)
        wait_for_progress(proc, 1 + round_ * 2000 // kills)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    remaining = sum(redis.Redis.from_url(redis_url).llen(q) for q in queue_names)
    assert 0 < remaining < len(expected), f"kills did not land mid-run (seed {seed})"
    finish_and_verify(stack, client_env, redis_url, queue_names, expected, kills, tmp_path)


def _stop_rabbitmq(stack: Stack) -> None:
    stack.processes["rabbitmq"].stop()


def _kill_router(stack: Stack) -> None:
    stack.processes["router"].kill()


def _restart(stack: Stack) -> None:
    stack.start_rabbitmq()
    stack.start_router()


@pytest.mark.parametrize(
    "fault", [_stop_rabbitmq, _kill_router], ids=["rabbitmq-down", "router-down"]
)
def test_broker_or_router_down_mid_run(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
    fault: Callable[[Stack], None],
) -> None:
    expected = fill(redis_url, queue_names, 4000)
    proc = start_migrate(client_env, redis_url)
    try:
        wait_for_progress(proc, 1000)
        fault(stack)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr
        assert "nothing was lost" in stderr
        assert stack.broker_account.password not in stderr
    finally:
        _restart(stack)
    finish_and_verify(stack, client_env, redis_url, queue_names, expected, 1, tmp_path)
