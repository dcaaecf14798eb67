"""One odd message never stops a queue: what AMQP cannot carry is found before publishing and
quarantined with its reason (exit 4), byte-exact; everything else moves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from packit_broker.stack import Stack
from tests.integration import backlog
from tests.integration.test_migrate import drain, run_migrate

pytestmark = pytest.mark.integration

EXIT_QUARANTINED = 4


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"meta": {"counter": 2**70}}, "AMQP carries at most 64-bit integers"),
        ({"blob": "x" * 140_000}, "content header frame holds"),
    ],
    ids=["int-beyond-64-bits", "headers-over-frame-max"],
)
def test_an_odd_message_is_quarantined_and_the_rest_moves(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
    headers: dict[str, object],
    reason: str,
) -> None:
    queue = queue_names[0]
    app = backlog.producer(redis_url, queue_names)
    good = [backlog.send(app, queue, f"before-{n}") for n in range(5)]
    app.send_task("taskapp.record", ("odd",), queue=queue, headers=headers)
    client = redis.Redis.from_url(redis_url)
    odd_raw = client.lindex(queue, 0)
    good += [backlog.send(app, queue, f"after-{n}") for n in range(5)]
    report_file = tmp_path / "report.json"
    done = run_migrate(client_env, "--from", redis_url, "--report", str(report_file))
    assert done.returncode == EXIT_QUARANTINED, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    report = json.loads(report_file.read_text())
    assert report["quarantined"] == 1 and reason in report["quarantine"][0]["reason"]
    assert sorted(m.headers["id"] for m in drain(stack, queue)) == sorted(good)
    assert client.lrange("packit_broker.quarantine", 0, -1) == [odd_raw]  # byte-exact
    assert client.llen(queue) == 0
