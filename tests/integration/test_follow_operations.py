"""The bridge under what operators and producers do while it runs: a queue that appears after
it started, and an old Redis worker that comes back, takes tasks and is killed. Judged by
where every task ends up and by what the report and the pending gauge say."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from packit_broker.stack import Stack
from packit_broker.stack.processes import free_port
from tests.integration import backlog
from tests.integration.rabbitmqctl import rabbitmqctl
from tests.integration.test_migrate import drain, queue_depth
from tests.integration.test_migrate_follow import metrics, poll, start_bridge

pytestmark = pytest.mark.integration

#: --resurvey-seconds for these runs (the default, 30 s, suits a large production database)
RESURVEY = 2.0


def _lists_left(redis_url: str) -> dict[str, int]:
    client = redis.Redis.from_url(redis_url)
    return {k.decode(): int(client.llen(k)) for k in client.keys("*") if client.type(k) == b"list"}


@contextmanager
def _bridge(
    client_env: dict[str, str], redis_url: str, report: Path, *args: str
) -> Iterator[subprocess.Popen[str]]:
    """A bridge writing `report` and surveying Redis every RESURVEY s; killed if the test
    leaves it running."""
    bridge = start_bridge(
        client_env, redis_url, "--report", str(report), "--resurvey-seconds", str(RESURVEY), *args
    )
    try:
        yield bridge
    finally:
        if bridge.poll() is None:
            bridge.kill()


def _stop(bridge: subprocess.Popen[str], report: Path) -> dict[str, object]:
    """SIGTERM, exit 0, the report, and under "_events" every JSON line the bridge printed."""
    bridge.send_signal(signal.SIGTERM)
    stdout, stderr = bridge.communicate(timeout=60)
    assert bridge.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {**json.loads(report.read_text()), "_events": events}


def test_a_queue_that_appears_after_the_start_is_moved_not_stranded(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.json"
    late = f"new-release-{uuid.uuid4().hex[:8]}"  # a producer release routing to a new queue
    with _bridge(client_env, redis_url, report) as bridge:
        time.sleep(2)  # the bridge has planned and is following
        app = backlog.producer(redis_url, (*queue_names, late))
        sent = [backlog.send(app, late, f"late-{n}") for n in range(30)]
        poll(lambda: queue_depth(stack, late) == len(sent), 3 * RESURVEY + 30, "moved")
        data = _stop(bridge, report)
    delivered = [m.headers["id"] for m in drain(stack, late)]
    assert sorted(delivered) == sorted(sent)
    assert data["complete"] is True and data["remaining"] == {}
    assert _lists_left(redis_url) == {}


def test_complete_is_false_while_a_late_queue_is_still_in_redis(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Stopped right after tasks landed in a queue nobody planned: either the bridge moved them
    in time (complete), or they are still in Redis and the report says so (not complete)."""
    report = tmp_path / "report.json"
    late = f"misrouted-{uuid.uuid4().hex[:8]}"
    with _bridge(client_env, redis_url, report) as bridge:
        time.sleep(2)
        app = backlog.producer(redis_url, (late,))
        sent = [backlog.send(app, late, f"late-{n}") for n in range(10)]
        data = _stop(bridge, report)
    left = _lists_left(redis_url)
    moved = [m.headers["id"] for m in drain(stack, late)] if queue_depth(stack, late) > 0 else []
    if left:
        assert data["complete"] is False
        assert sum(left.values()) == sum(data["remaining"].values()) == len(sent) - len(moved)
    else:
        assert data["complete"] is True and sorted(moved) == sorted(sent)


def test_an_old_worker_killed_mid_bridge_leaves_nothing_behind(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    report, port = tmp_path / "report.json", free_port()
    queue = queue_names[0]
    client = redis.Redis.from_url(redis_url)
    with _bridge(client_env, redis_url, report, "--metrics-port", str(port)) as bridge:
        time.sleep(2)
        app = backlog.producer(redis_url, queue_names)
        # An old Redis worker comes back: the bridge pauses for it, the worker takes three
        # tasks published meanwhile, and it is SIGKILLed holding them.
        worker = threading.Thread(
            target=backlog.kill_consumer_holding, args=(redis_url, queue, 3), daemon=True
        )
        worker.start()
        poll(lambda: metrics(port).get("packit_migrate_paused") == 1, 30, "paused")
        held = [backlog.send(app, queue, f"held-{n}") for n in range(3)]
        worker.join(timeout=60)
        assert client.hlen("unacked") == len(held)
        gauge = f'packit_migrate_pending{{queue="{queue}"}}'
        # Delivered a moment ago: the freshness rule keeps them in Redis, and they count.
        poll(lambda: metrics(port).get(gauge) == len(held), 30, "counted as pending")
        assert queue_depth(stack, queue) == 0
        backlog.backdate_unacked(client, 3600)  # the worker died an hour ago
        poll(lambda: queue_depth(stack, queue) == len(held), 3 * RESURVEY + 30, "moved")
        poll(lambda: metrics(port).get(gauge) == 0, 30, "pending back to 0")
        data = _stop(bridge, report)
    assert sorted(m.headers["id"] for m in drain(stack, queue)) == sorted(held)
    assert client.hlen("unacked") == 0
    assert data["complete"] is True and data["unacked_migrated"] == len(held)


def test_a_queue_deleted_mid_bridge_is_declared_again_nothing_quarantined(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.json"
    queue = queue_names[0]
    app = backlog.producer(redis_url, queue_names)
    with _bridge(client_env, redis_url, report) as bridge:
        first = [backlog.send(app, queue, f"before-{n}") for n in range(5)]
        poll(lambda: queue_depth(stack, queue) == len(first), 30, "moved")
        rabbitmqctl(stack, "delete_queue", queue)  # an operator deletes it, with its tasks
        later = [backlog.send(app, queue, f"after-{n}") for n in range(5)]
        poll(lambda: queue_depth(stack, queue) == len(later), 30, "moved after the delete")
        data = _stop(bridge, report)
    assert sorted(m.headers["id"] for m in drain(stack, queue)) == sorted(later)
    notices = [e["text"] for e in data["_events"] if e.get("event") == "notice"]
    assert any("had vanished" in str(t) and queue in str(t) for t in notices), notices
    assert data["quarantined"] == 0 and data["complete"] is True
    assert redis.Redis.from_url(redis_url).llen("packit_broker.quarantine") == 0


def test_a_dropped_lock_connection_does_not_let_a_second_bridge_in(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.json"
    client = redis.Redis.from_url(redis_url)
    queue = queue_names[0]
    with _bridge(client_env, redis_url, report) as first:
        poll(lambda: client.get("packit_broker.lock") is not None, 30, "locked")
        holder = json.loads(client.get("packit_broker.lock") or b"{}")
        owner = holder["owner"]
        killed = 0
        for entry in client.client_list():
            if entry.get("name") == holder["client_name"]:
                client.client_kill_filter(_id=entry["id"])
                killed += 1
        assert killed == 1, "the lock's connection is not named after its owner"
        second = start_bridge(client_env, redis_url, "--report", str(tmp_path / "second.json"))
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 3, stderr  # refused: the first one still holds it
        assert owner in stderr
        app = backlog.producer(redis_url, queue_names)
        sent = [backlog.send(app, queue, f"after-{n}") for n in range(5)]
        poll(lambda: queue_depth(stack, queue) == len(sent), 30, "moved by the first bridge")
        data = _stop(first, report)
    assert sorted(m.headers["id"] for m in drain(stack, queue)) == sorted(sent)
    assert data["complete"] is True
