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


def start_migrate(env: dict[str, str], redis_url: str, *args: str) -> subprocess.Popen[str]:
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
            *args,
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


def _kill_rabbitmq(stack: Stack) -> None:
    stack.processes["rabbitmq"].kill()


def _kill_router(stack: Stack) -> None:
    stack.processes["router"].kill()


def _restart(stack: Stack) -> None:
    stack.start_rabbitmq()
    stack.start_router()


@pytest.mark.parametrize(
    ("fault", "layer"),
    [(_stop_rabbitmq, "[node-lost]"), (_kill_router, "[router]")],
    ids=["rabbitmq-down", "router-down"],
)
def test_broker_or_router_down_for_good_fails_naming_the_layer_after_the_bound(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
    fault: Callable[[Stack], None],
    layer: str,
) -> None:
    """Down for longer than --reconnect-seconds: exit 1 naming what is gone (the node behind
    a router that still answers, or the router itself) - never TLS or SNI - and that a rerun is
    safe; the rerun finishes with every task exactly once or listed."""
    expected = fill(redis_url, queue_names, 4000)
    proc = start_migrate(client_env, redis_url, "--reconnect-seconds", "5")
    try:
        wait_for_progress(proc, 1000)
        fault(stack)
        out, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 1, stderr
        assert f"error: {layer} RabbitMQ" in stderr, stderr
        assert "lost mid-run" in stderr and "rerun the same command - that is safe" in stderr
        assert "SNI" not in stderr and "[tls]" not in stderr, stderr
        assert "nothing was lost" in stderr
        assert '"LOST the connection to RabbitMQ' in out
        assert stack.broker_account.password not in stderr + out
        print(f"gave up after {fault.__name__}:\n{stderr}")
    finally:
        _restart(stack)
    finish_and_verify(stack, client_env, redis_url, queue_names, expected, 1, tmp_path)


@pytest.mark.parametrize(
    "fault", [_kill_rabbitmq, _kill_router], ids=["rabbitmq-killed", "router-killed"]
)
def test_connection_lost_mid_run_is_reconnected_and_the_run_finishes(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
    fault: Callable[[Stack], None],
) -> None:
    """Issue 11: RabbitMQ SIGKILLed (or the router killed) mid-run and back within the bound:
    the same run reconnects, sends again what was unconfirmed and finishes with exit 0 -
    nothing lost, every task that arrived twice listed, nothing left in Redis."""
    expected = fill(redis_url, queue_names, 4000)
    report_file = tmp_path / "report.json"
    proc = start_migrate(client_env, redis_url, "--report", str(report_file))
    try:
        wait_for_progress(proc, 1000)
        fault(stack)
        time.sleep(2)
    finally:
        _restart(stack)
    out, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    notices = [e["text"] for e in map(json.loads, out.splitlines()) if e["event"] == "notice"]
    assert any(n.startswith("LOST the connection to RabbitMQ") for n in notices), notices
    assert any(n.startswith("reconnected to RabbitMQ") for n in notices), notices
    report = json.loads(report_file.read_text())
    assert report["complete"] is True and report["remaining"] == {}
    client = redis.Redis.from_url(redis_url)
    assert all(client.llen(q) == 0 for q in queue_names)
    assert client.get("packit_broker.inflight") is None
    delivered = collections.Counter(
        m.properties["application_headers"]["id"] for q in queue_names for m in drain(stack, q)
    )
    assert set(delivered) == expected, "lost or invented messages"
    duplicates = {task_id for task_id, n in delivered.items() if n > 1}
    listed = set(report["possible_duplicates"])
    assert duplicates <= listed, "an unreported duplicate"
    assert len(listed) <= BATCH, "more listed than one confirm window"
    assert sum(report["migrated"].values()) >= len(expected)
    back = next(n for n in notices if n.startswith("reconnected"))
    print(
        f"one-shot through {fault.__name__}: {len(expected)} moved, exit 0, {back.split(':')[0]},"
        f" {len(duplicates)} arrived twice, {len(listed)} listed"
    )
