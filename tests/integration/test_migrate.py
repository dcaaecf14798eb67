"""Issue: migrate. Real Redis backlog -> RabbitMQ through the router -> a real Celery worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import amqp
import pytest
import redis

from packit_broker.stack import Stack
from tests.integration import backlog
from tests.integration.workers import celery_worker

pytestmark = pytest.mark.integration


def run_migrate(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "packit_broker", "migrate", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def drain(stack: Stack, queue: str) -> list[amqp.Message]:
    """Every message now in `queue` (acked: the queue is emptied)."""
    messages = []
    with stack.amqp_connection() as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            messages.append(message)
    return messages


def queue_depth(stack: Stack, queue: str) -> int:
    """Messages in `queue`, or -1 if it does not exist."""
    with stack.amqp_connection() as conn:
        try:
            return int(conn.channel().queue_declare(queue, passive=True).message_count)
        except amqp.exceptions.NotFound:
            return -1


def test_full_cutover_executes_every_task_once_in_priority_order(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    env = {**client_env, "PACKIT_BROKER_MAX_PRIORITY": "10"}
    short, long_, limited = queue_names
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names)
    # Killed worker: 2 tasks taken from `short` and never acked.
    for i in range(2):
        backlog.send(app, short, f"{short}:unacked-{i}")
    backlog.kill_consumer_holding(redis_url, short, 2)
    assert client.hlen("unacked") == 2
    # Priorities: Redis 0 is highest. Mixed order of sending.
    for i, prio in enumerate([9, 0, 6, 3, 0, 9, 3, 6]):
        backlog.send(app, short, f"{short}:p{prio}-{i}", priority=prio)
    for i in range(5):
        backlog.send(app, long_, f"{long_}:plain-{i}")
    countdown_ids = [
        backlog.send(app, limited, f"{limited}:countdown-{i}", countdown=3, expires=3600)
        for i in range(3)
    ]
    for raw in backlog.MALFORMED.values():
        client.lpush(long_, raw)
    oversized = json.dumps(
        {
            "body": "A" * 4000,
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"task": "taskapp.record", "id": "big"},
            "properties": {"delivery_tag": "big"},
        }
    ).encode()
    client.lpush(limited, oversized)
    before = {key: client.dump(key) for key in client.keys("*")}

    # Dry run: the plan, nothing touched anywhere, and the exit code of the real run (the
    # killed worker's unacked entries are fresh, so it would refuse: 3).
    dry = run_migrate(env, "--from", redis_url, "--dry-run", "--json")
    assert dry.returncode == 3, dry.stderr
    assert "unacked" in dry.stderr
    plan = json.loads(dry.stdout)
    by_name = {q["name"]: q for q in plan["queues"]}
    assert by_name[short]["priority_buckets"] == {"0": 2, "3": 2, "6": 2, "9": 2}
    assert by_name[short]["unacked"] == 2
    assert by_name[short]["declare"]["arguments"] == {"x-max-priority": 10}
    assert {key: client.dump(key) for key in client.keys("*")} == before
    assert queue_depth(stack, short) == -1  # not even declared

    # The killed worker's entries are fresh: looks like a live worker -> refused.
    refused = run_migrate(env, "--from", redis_url)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "unacked" in refused.stderr
    backlog.backdate_unacked(client, 7200)

    report_file = tmp_path / "report.json"
    done = run_migrate(
        env, "--from", redis_url, "--report", str(report_file), "--max-message-size", "2000"
    )
    assert done.returncode == 4, done.stdout + done.stderr  # finished, with quarantine
    assert stack.redis_password not in done.stdout + done.stderr
    assert stack.broker_account.password not in done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert report["migrated"] == {short: 10, long_: 5, limited: 3}
    assert report["unacked_migrated"] == 2
    assert report["quarantined"] == len(backlog.MALFORMED) + 1
    quarantined = client.lrange("packit_broker.quarantine", 0, -1)
    assert sorted(quarantined) == sorted([*backlog.MALFORMED.values(), oversized])
    for key in (short, long_, limited, "unacked"):
        assert not client.exists(key), key
    assert client.zcard("unacked_index") == 0

    # A real worker configured by celery_config() runs everything exactly once.
    log = tmp_path / "ran.tsv"
    with celery_worker({**env, "TASKAPP_LOG": str(log)}, list(queue_names), tmp_path / "w.log"):
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 18:
                break
            time.sleep(0.3)
        time.sleep(1)  # anything extra (a duplicate) would show up now
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    labels = [r[0] for r in rows]
    assert len(labels) == len(set(labels)) == 18
    short_order = [label.split(":")[1] for label in labels if label.startswith(short + ":")]
    # unacked first, then buckets 0, 3, 6, 9, each oldest first
    assert short_order == [
        "unacked-0",
        "unacked-1",
        "p0-1",
        "p0-4",
        "p3-3",
        "p3-6",
        "p6-2",
        "p6-7",
        "p9-0",
        "p9-5",
    ]
    assert [lbl.split(":")[1] for lbl in labels if lbl.startswith(long_ + ":")] == [
        f"plain-{i}" for i in range(5)
    ]
    ran_countdown = {r[1] for r in rows if ":countdown-" in r[0]}
    assert ran_countdown == set(countdown_ids)
    assert all(r[2] == limited for r in rows if ":countdown-" in r[0])


def test_discovers_queues_and_keeps_message_fields(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    extra = queue_names[0] + "-extra"
    app = backlog.producer(redis_url, [*queue_names, extra])
    task_id = backlog.send(app, extra, "x", expires=3600, retries=3, headers={"custom": "yes"})
    raw = redis.Redis.from_url(redis_url).lindex(extra, 0)
    stored = json.loads(raw)
    done = run_migrate(client_env, "--from", redis_url, "--json")
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.splitlines()[-1])
    assert last["migrated"][extra] == 1
    (message,) = drain(stack, extra)
    import base64

    body = message.body  # py-amqp decodes text bodies by their content_encoding
    body = body.encode(stored["content-encoding"]) if isinstance(body, str) else body
    assert body == base64.b64decode(stored["body"])
    assert message.properties["application_headers"] == stored["headers"]
    assert message.properties["application_headers"]["id"] == task_id
    assert message.properties["content_type"] == stored["content-type"]
    assert message.properties["content_encoding"] == stored["content-encoding"]
    assert message.properties["correlation_id"] == stored["properties"]["correlation_id"]
    assert message.properties["delivery_mode"] == 2
    # Celery on Redis published to the default exchange; that is kept, routing key = queue.
    assert stored["properties"]["delivery_info"] == {"exchange": "", "routing_key": extra}
    assert message.delivery_info["exchange"] == ""
    assert message.delivery_info["routing_key"] == extra


def test_live_consumer_is_refused(
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    app = backlog.producer(redis_url, queue_names)
    backlog.send(app, queue_names[0], "waiting")
    # redis-py 8 times out every read after 5 s by default: longer than the BRPOP's own 5 s
    blocker = redis.Redis.from_url(redis_url, socket_timeout=30)
    blocker.client_setname("celery-worker-standin")
    import threading

    thread = threading.Thread(target=lambda: blocker.brpop(["nothing-here"], timeout=5))
    thread.start()
    time.sleep(0.5)
    try:
        refused = run_migrate(client_env, "--from", redis_url)
    finally:
        thread.join()
    assert refused.returncode == 3
    assert "celery-worker-standin" in refused.stderr and "brpop" in refused.stderr
    assert redis.Redis.from_url(redis_url).llen(queue_names[0]) == 1


def test_quorum_queues_declared_as_workers_declare_them(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    env = {**client_env, "PACKIT_BROKER_QUEUE_TYPE": "quorum"}
    app = backlog.producer(redis_url, queue_names)
    ids = {backlog.send(app, q, f"{q}:quorum") for q in queue_names}
    done = run_migrate(env, "--from", redis_url)
    assert done.returncode == 0, done.stderr
    log = tmp_path / "ran.tsv"
    # The worker redeclares the same quorum queues: a mismatch would be PRECONDITION_FAILED.
    with celery_worker({**env, "TASKAPP_LOG": str(log)}, list(queue_names), tmp_path / "w.log"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.3)
    assert {line.split("\t")[1] for line in log.read_text().splitlines()} == ids
    assert "PRECONDITION_FAILED" not in (tmp_path / "w.log").read_text()


def test_usage_errors_exit_2_without_passwords(client_env: dict[str, str], redis_url: str) -> None:
    bad = run_migrate({**client_env, "PACKIT_BROKER_CONNECT_TO": "nowhere"}, "--from", redis_url)
    assert bad.returncode == 2
    assert "PACKIT_BROKER_CONNECT_TO" in bad.stderr
    wrong_redis = redis_url.replace(redis_url.split("@")[0], "redis://:wrong-password")
    failed = run_migrate(client_env, "--from", wrong_redis)
    assert failed.returncode == 1
    assert "[redis-login] Redis" in failed.stderr and "wrong-password" not in failed.stderr
    no_url = run_migrate({**client_env, "PACKIT_BROKER_URL": ""}, "--from", redis_url)
    assert no_url.returncode == 2 and "PACKIT_BROKER_URL" in no_url.stderr


@pytest.mark.parametrize("count", [1, 99, 100, 101, 250])
def test_batch_boundaries_keep_order(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    count: int,
) -> None:
    """Batches of 100 with a read-ahead: every size around the boundary arrives once, in order."""
    queue = queue_names[0]
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names)
    first = backlog.send(app, queue, "0")
    template = client.lindex(queue, 0)
    assert template is not None
    later = backlog.clone_many(client, queue, template, [str(i) for i in range(1, count)])
    done = run_migrate(client_env, "--from", redis_url, "--batch-size", "100")
    assert done.returncode == 0, done.stderr
    ids = [m.properties["application_headers"]["id"] for m in drain(stack, queue)]
    assert ids == [first, *later]
    assert client.llen(queue) == 0


def test_broker_errors_name_the_layer(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    """Wrong password -> amqp-login; a user without rights on the queues -> permission."""
    app = backlog.producer(redis_url, queue_names)
    backlog.send(app, queue_names[0], "stays")
    wrong = client_env["PACKIT_BROKER_URL"].replace(stack.broker_account.password, "nope-nope")
    denied = run_migrate({**client_env, "PACKIT_BROKER_URL": wrong}, "--from", redis_url)
    assert denied.returncode == 1
    assert "[amqp-login]" in denied.stderr and "nope-nope" not in denied.stderr
    limited = stack.broker_env(stack.limited_account)
    no_rights = run_migrate({**client_env, **limited}, "--from", redis_url)
    assert no_rights.returncode == 1
    assert "[permission]" in no_rights.stderr and queue_names[0] in no_rights.stderr
    assert stack.limited_account.password not in no_rights.stderr
    assert redis.Redis.from_url(redis_url).llen(queue_names[0]) == 1  # nothing moved, nothing lost
