"""Issue 10, the rollback: RabbitMQ -> Redis with `migrate --from amqps://... --to redis://...`,
on real RabbitMQ (through the router), real Redis, real Celery producers and workers."""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import amqp
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection, Producer

from packit_broker.codecs import AmqpMessage, from_redis, to_amqp
from packit_broker.config import broker_from_env
from packit_broker.kombu_layout import KombuLayout
from packit_broker.messages import TaskMessage
from packit_broker.migrate import MigrateOptions, Migration, make_plan
from packit_broker.migrate.redis_sink import Journal, RedisEntry, RedisSink
from packit_broker.migrate.redis_source import INFLIGHT, RedisSource, RunLock
from packit_broker.migrate.rollback import Rollback, RollbackOptions
from packit_broker.queues import QueueSettings, QueueSpec
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process, free_port
from tests.integration import backlog
from tests.integration.test_migrate import queue_depth, run_migrate
from tests.integration.test_migrate_follow import metrics, wait_for_notice
from tests.integration.workers import REPO

pytestmark = pytest.mark.integration

MAX_PRIORITY = 10


def rollback_env(client_env: dict[str, str], redis_url: str) -> dict[str, str]:
    """The documented form: both URLs in the environment, none in argv; the AMQP side takes
    the PACKIT_BROKER_CA_FILE / CONNECT_TO settings; PACKIT_BROKER_URL is not needed."""
    env = {**client_env, "PACKIT_BROKER_MAX_PRIORITY": str(MAX_PRIORITY)}
    env["PACKIT_MIGRATE_FROM"] = env.pop("PACKIT_BROKER_URL")
    env["PACKIT_MIGRATE_TO"] = redis_url
    return env


def start_rollback(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "packit_broker", "migrate", "--json", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def drain_exact(stack: Stack, queue: str) -> list[amqp.Message]:
    """Every message now in `queue`, bodies as the exact bytes (no auto-decoding); acked."""
    messages = []
    with stack.amqp_connection() as conn:
        channel = conn.channel()
        channel.auto_decode = False
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            messages.append(message)
    return messages


def body_of(message: amqp.Message) -> bytes:
    """The exact body (py-amqp leaves a bodyless message's default, an empty str)."""
    body = message.body
    assert isinstance(body, bytes) or body == "", "auto_decode turned a body into text"
    return body if isinstance(body, bytes) else b""


def consumers(stack: Stack, queue: str) -> int:
    with stack.amqp_connection() as conn:
        return int(conn.channel().queue_declare(queue, passive=True).consumer_count)


def publish(
    stack: Stack, spec: QueueSpec, messages: list[AmqpMessage], *, wait: bool = True
) -> None:
    """Publish straight to RabbitMQ (as a producer after the cut-over would) and wait until
    the queue holds them all (unless it is being consumed)."""
    with stack.amqp_connection() as conn:
        channel = conn.channel()
        spec.declare(channel)
        before = int(channel.queue_declare(spec.name, passive=True).message_count)
        for m in messages:
            channel.basic_publish(
                amqp.Message(m.body, **m.properties), exchange=m.exchange, routing_key=m.routing_key
            )
    if not wait:
        return
    deadline = time.monotonic() + 30
    while queue_depth(stack, spec.name) < before + len(messages):
        assert time.monotonic() < deadline, "RabbitMQ did not take the messages"
        time.sleep(0.1)


def celery_messages(redis_url: str, spec: QueueSpec, count: int) -> list[AmqpMessage]:
    """`count` copies of a real Celery task message (fresh ids), as the forward run would
    have published them to `spec`."""
    client = redis.Redis.from_url(redis_url)
    scratch = f"template-{uuid.uuid4().hex[:8]}"
    backlog.send(backlog.producer(redis_url, (scratch,)), scratch, "template")
    raw = client.rpop(scratch)
    assert raw is not None
    template = from_redis(raw)
    out = []
    for i in range(count):
        task_id = str(uuid.uuid4())
        headers = {**template.headers, "id": task_id, "root_id": task_id}
        body = json.dumps([[f"{spec.name}:{i}"], {}, {}]).encode()
        message = type(template)(
            body=body,
            headers=headers,
            properties={**template.properties, "correlation_id": task_id},
            content_type=template.content_type,
            content_encoding=template.content_encoding,
            exchange="",
            routing_key=spec.name,
        )
        out.append(to_amqp(message, queue=spec.name, max_priority=spec.max_priority))
    return out


def ids_in_redis(client: redis.Redis, layout: KombuLayout, queue: str) -> list[str]:
    ids = []
    for key in layout.bucket_keys(queue).values():
        for raw in client.lrange(key, 0, -1):
            ids.append(json.loads(raw)["headers"]["id"])
    return ids


@contextlib.contextmanager
def redis_worker(redis_url: str, queues: list[str], log: Path, worker_log: Path) -> Iterator[None]:
    """A real Celery worker back on Redis: solo pool, one task at a time, logging the order."""
    argv = [
        sys.executable, "-m", "celery", "-A", "tests.integration.redis_taskapp", "worker",
        "-P", "solo", "-Q", ",".join(queues), "-l", "warning", "--without-gossip",
        "--without-mingle", "--without-heartbeat", "-n", f"rollback-{uuid.uuid4().hex[:6]}@%h",
    ]  # fmt: skip
    env = {
        "REDIS_TASKAPP_URL": redis_url,
        "REDIS_TASKAPP_QUEUES": ",".join(queues),
        "REDIS_TASKAPP_LOG": str(log),
        "PYTHONPATH": str(REPO),
    }
    proc = Process("redis-worker", argv, worker_log, env=env, cwd=REPO)
    proc.start()
    try:
        yield
    finally:
        proc.stop()


def lines(log: Path, count: int, timeout: float = 90) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            break
        time.sleep(0.3)
    time.sleep(1)  # a duplicate would show up now
    return [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []


# -- the round trip, over generated Celery messages ---------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text("abcdefghij_-", min_size=1, max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
WHEN = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC).isoformat()
)


@st.composite
def celery_message(draw: st.DrawFn) -> dict[str, Any]:
    """What a Celery producer passes to kombu: protocol 2 headers (eta/expires included),
    properties, priority, a body of any bytes with its content type and encoding."""
    task_id = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
    headers: dict[str, Any] = {
        "lang": "py",
        "task": draw(st.sampled_from(["taskapp.record", "packit.tasks.process_message"])),
        "id": task_id,
        "shadow": None,
        "eta": draw(st.none() | WHEN),
        "expires": draw(st.none() | WHEN),
        "group": None,
        "group_index": None,
        "retries": draw(st.integers(0, 14)),
        "timelimit": [None, draw(st.none() | st.integers(1, 3600))],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": draw(st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)),
        "kwargsrepr": "{}",
        "origin": "gen1@packit",
        "ignore_result": draw(st.booleans()),
    }
    headers.update(
        draw(st.dictionaries(st.sampled_from(["custom", "x-extra", "stamps"]), JSON_VALUES))
    )
    content = draw(
        st.sampled_from(
            [("application/json", "utf-8"), ("application/x-python-serialize", "binary")]
        )
    )
    return {
        "body": draw(st.binary(max_size=300)),
        "headers": headers,
        "content_type": content[0],
        "content_encoding": content[1],
        "priority": draw(st.integers(0, 9)),
        "correlation_id": task_id,
        "reply_to": draw(st.none() | st.text("abcdef0123456789-", min_size=1, max_size=36)),
    }


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    messages=st.lists(
        celery_message(), min_size=1, max_size=6, unique_by=lambda m: str(m["headers"]["id"])
    )
)
def test_round_trip_redis_rabbitmq_redis_rabbitmq_is_byte_exact(
    stack: Stack, redis_url: str, messages: list[dict[str, Any]]
) -> None:
    queue = f"roundtrip-{uuid.uuid4().hex[:8]}"
    settings_ = QueueSettings(names=(queue,), max_priority=MAX_PRIORITY)
    layout = KombuLayout()
    broker = broker_from_env(stack.broker_env())
    client = redis.Redis.from_url(redis_url)
    with Connection(redis_url) as conn:  # the real producer writes the original envelopes
        producer = Producer(conn.default_channel)
        for m in messages:
            fields = {k: v for k, v in m.items() if k != "body"}
            producer.publish(m["body"], exchange="", routing_key=queue, **fields)
    original = {key: client.lrange(key, 0, -1) for key in layout.bucket_keys(queue).values()}

    def forward() -> None:
        source = RedisSource.from_url(redis_url, layout)
        options = MigrateOptions(queues=(queue,), force=True, include_unacked=False)
        report = Migration(source, broker, settings_, options).run(
            make_plan(source, settings_, options)
        )
        assert report.total == len(messages) and report.complete and not report.quarantine

    def back() -> None:
        store = RedisSource.from_url(redis_url, layout)
        with Rollback(broker, store, settings_, RollbackOptions(queues=(queue,))) as rollback:
            report = rollback.run(rollback.plan())
        assert report.total == len(messages) and report.complete and not report.quarantine

    forward()
    assert queue_depth(stack, queue) == len(messages)
    back()
    assert queue_depth(stack, queue) == 0
    rolled = {key: client.lrange(key, 0, -1) for key in layout.bucket_keys(queue).values()}
    # Redis again: each message in its bucket, the bucket's order kept, every field as the
    # producer wrote it but the transport's own (a fresh delivery_tag; priority = the bucket).
    for key, entries in original.items():
        assert len(rolled[key]) == len(entries), key
        for was_raw, now_raw in zip(entries, rolled[key], strict=True):
            was, now = json.loads(was_raw), json.loads(now_raw)
            assert base64.b64decode(now["body"]) == base64.b64decode(was["body"])
            assert now["headers"] == was["headers"]
            assert (now["content-type"], now["content-encoding"]) == (
                was["content-type"],
                was["content-encoding"],
            )
            for prop in ("correlation_id", "reply_to", "delivery_mode", "delivery_info"):
                assert now["properties"].get(prop) == was["properties"].get(prop), prop
            assert layout.bucket_of(now["properties"]["priority"]) == layout.bucket_of(
                was["properties"]["priority"]
            )
            assert now["properties"]["body_encoding"] == "base64"
    forward()
    final = drain_exact(stack, queue)
    expected = [
        to_amqp(from_redis(raw, layout), queue=queue, max_priority=MAX_PRIORITY)
        for step in layout.reachable_steps()
        for raw in reversed(original[layout.queue_key(queue, step)])
    ]
    assert len(final) == len(expected)
    by_id = {m.headers["id"]: m for m in expected}
    for got in final:
        want = by_id[got.properties["application_headers"]["id"]]
        assert body_of(got) == want.body
        assert got.properties["application_headers"] == want.headers
        for prop, value in want.properties.items():
            if prop != "application_headers":
                assert got.properties.get(prop) == value, prop
    assert [m.properties["application_headers"]["id"] for m in final] == [
        m.task_id for m in expected
    ], "priority order or FIFO within a priority changed"


# -- a real worker on Redis runs what was rolled back -------------------------------------------


def test_redis_worker_runs_rolled_back_tasks_in_priority_order(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    env = {**client_env, "PACKIT_BROKER_MAX_PRIORITY": str(MAX_PRIORITY)}
    short, long_, _ = queue_names
    app = backlog.producer(redis_url, queue_names)
    for i, prio in enumerate([9, 0, 6, 3, 0, 9, 3, 6]):
        backlog.send(app, short, f"p{prio}-{i}", priority=prio)
    countdown = backlog.send(app, long_, "countdown", countdown=2, expires=3600)
    forward = run_migrate(env, "--from", redis_url)
    assert forward.returncode == 0, forward.stderr
    client = redis.Redis.from_url(redis_url)
    client.flushdb()  # the producer's bindings too: the rollback has to write them
    assert queue_depth(stack, short) == 8

    back_env = rollback_env(client_env, redis_url)
    report_file = tmp_path / "rollback.json"
    dry = run_migrate(back_env, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert {q["name"]: q["messages"] for q in plan["queues"]}[short] == 8
    assert client.dbsize() == 0 and queue_depth(stack, short) == 8  # the dry run touched nothing
    done = run_migrate(back_env, "--report", str(report_file))
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert stack.broker_account.password not in output and stack.redis_password not in output
    report = json.loads(report_file.read_text())
    assert report["direction"] == "rollback"
    assert report["migrated"][short] == 8 and report["migrated"][long_] == 1
    assert report["complete"] and not report["possible_duplicates"]
    assert queue_depth(stack, short) == 0 and queue_depth(stack, long_) == 0

    # The bindings are what a Redis worker declaring the queue writes itself (kombu).
    written = {k: client.smembers(k) for k in client.keys("_kombu.binding*")}
    scratch = redis_url.rsplit("/", 1)[0] + "/0"
    scratch_client = redis.Redis.from_url(scratch)
    with Connection(scratch) as conn:
        for name in queue_names:
            QueueSettings(names=queue_names).spec(name).kombu_queue()(
                conn.default_channel
            ).declare()
    kombu_written = {
        k: scratch_client.smembers(k)
        for k in scratch_client.keys("_kombu.binding*")
        if any(name.encode() in k for name in queue_names)
    }
    for name in queue_names:
        scratch_client.delete(f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")
    assert written == kombu_written

    log = tmp_path / "ran.tsv"
    with redis_worker(redis_url, [short, long_], log, tmp_path / "worker.log"):
        rows = lines(log, 9)
    labels = [r[0] for r in rows]
    assert len(labels) == len(set(labels)) == 9, labels
    assert [label for label in labels if label.startswith("p")] == [
        "p0-1", "p0-4", "p3-3", "p3-6", "p6-2", "p6-7", "p9-0", "p9-5",
    ]  # fmt: skip
    (ran_countdown,) = [r for r in rows if r[0] == "countdown"]
    assert ran_countdown[1] == countdown and ran_countdown[2] == long_


# -- crash safety ---------------------------------------------------------------------------------


def wait_for_progress(proc: subprocess.Popen[str], at_least: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event.get("event") == "progress" and event["moved"] >= at_least:
            return
    pytest.fail(f"rollback ended early: {proc.stderr.read() if proc.stderr else ''}")


def test_sigkill_mid_rollback_loses_nothing_and_lists_every_duplicate(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    batch, per_queue = 200, 3000
    settings_ = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY)
    expected: set[str] = set()
    for name in queue_names:
        messages = celery_messages(redis_url, settings_.spec(name), per_queue)
        publish(stack, settings_.spec(name), messages)
        expected.update(m.task_id or "" for m in messages)
    env = rollback_env(client_env, redis_url)
    # Moved by each run before its kill (at least): early, mid-queue, across a queue boundary;
    # 4,600 of 9,000 leave room for a kill that lands later than asked.
    kills = [300, 2300, 2000]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for at_least in kills:
        proc = start_rollback(env, "--batch-size", str(batch))
        wait_for_progress(proc, at_least)
        time.sleep(rng.uniform(0.0, 0.05))  # any instant: reading, writing, acking
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 30  # RabbitMQ notices the closed connection
        while any(consumers(stack, q) for q in queue_names):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    left = sum(queue_depth(stack, q) for q in queue_names)
    assert 0 < left < len(expected), f"kills did not land mid-run (seed {seed})"
    report_file = tmp_path / "final.json"
    final = run_migrate(env, "--batch-size", str(batch), "--report", str(report_file))
    assert final.returncode == 0, final.stdout + final.stderr
    report = json.loads(report_file.read_text())
    assert report["taken_over_from"]  # the last killed run's lock
    client = redis.Redis.from_url(redis_url)
    delivered = collections.Counter(
        task_id for q in queue_names for task_id in ids_in_redis(client, KombuLayout(), q)
    )
    assert set(delivered) == expected, "lost or invented messages"
    assert all(queue_depth(stack, q) == 0 for q in queue_names)
    duplicates = {task_id for task_id, n in delivered.items() if n > 1}
    unreported = duplicates - set(report["possible_duplicates"])
    assert not unreported, f"{len(unreported)} unreported duplicates (seed {seed})"
    assert len(duplicates) <= batch * len(kills)
    assert all(n <= 2 for n in delivered.values())
    assert not client.exists("packit_broker.inflight")
    assert client.llen("packit_broker.possible_duplicates") == 0  # listed in the report now


# -- --follow ------------------------------------------------------------------------------------


def test_follow_pauses_while_rabbitmq_is_consumed_then_moves_until_idle(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    first, later = celery_messages(redis_url, spec, 3), celery_messages(redis_url, spec, 2)
    publish(stack, spec, first)
    client = redis.Redis.from_url(redis_url)
    report_file = tmp_path / "report.json"
    env = rollback_env(client_env, redis_url)
    worker = stack.amqp_connection()  # a worker still on RabbitMQ, holding one delivery
    channel = worker.__enter__().channel()
    channel.basic_qos(0, 1, False)
    channel.basic_consume(short, callback=lambda message: None)
    port = free_port()
    proc = start_rollback(
        env, "--follow", "--until-idle", "3", "--queue", short, "--report", str(report_file),
        "--metrics-port", str(port),
    )  # fmt: skip
    try:
        notice = wait_for_notice(proc, "PAUSED")
        assert short in notice and "stop it" in notice
        time.sleep(1)
        assert ids_in_redis(client, KombuLayout(), short) == []  # nothing moves while paused
        seen = metrics(port)
        assert seen["packit_migrate_paused"] == 1
        assert seen[f'packit_migrate_pending{{queue="{short}"}}'] == 2  # the worker holds one
        worker.__exit__(None, None, None)  # the worker stops: its delivery is requeued
        wait_for_notice(proc, "resumed")
        publish(stack, spec, later, wait=False)  # a producer still on RabbitMQ
        moved = f'packit_migrate_moved_total{{queue="{short}"}}'
        deadline = time.monotonic() + 60
        while metrics(port).get(moved, 0) < 5:  # read before --until-idle ends the run
            assert time.monotonic() < deadline and proc.poll() is None, "moves not counted"
            time.sleep(0.2)
        seen = metrics(port)
        assert seen["packit_migrate_paused"] == 0 and seen["packit_migrate_connected"] == 1
        assert seen[f'packit_migrate_batch_latency_seconds_count{{queue="{short}"}}'] >= 1
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    report = json.loads(report_file.read_text())
    assert report["migrated"] == {short: 5} and report["complete"]
    assert sorted(ids_in_redis(client, KombuLayout(), short)) == sorted(
        m.task_id or "" for m in first + later
    )
    assert queue_depth(stack, short) == 0


def test_sigterm_stops_a_following_rollback_cleanly(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """SIGTERM: the batch in flight is finished (written and acknowledged), the report names
    what is left, exit 0; RabbitMQ and Redis together hold every message exactly once."""
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    messages = celery_messages(redis_url, spec, 3000)
    publish(stack, spec, messages)
    report_file = tmp_path / "report.json"
    env = rollback_env(client_env, redis_url)
    proc = start_rollback(
        env, "--follow", "--queue", short, "--batch-size", "20", "--report", str(report_file)
    )
    wait_for_progress(proc, 100)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    report = json.loads(report_file.read_text())
    moved = ids_in_redis(redis.Redis.from_url(redis_url), KombuLayout(), short)
    assert report["migrated"][short] == len(moved) < len(messages)
    left = [m.properties["application_headers"]["id"] for m in drain_exact(stack, short)]
    assert report["remaining"] == {short: len(left)}
    assert sorted(moved + left) == sorted(m.task_id or "" for m in messages)


# -- refusals, quarantine -------------------------------------------------------------------------


def test_live_consumer_refuses_and_force_moves_what_it_does_not_hold(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    messages = celery_messages(redis_url, spec, 5)
    publish(stack, spec, messages)
    env = rollback_env(client_env, redis_url)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    with stack.amqp_connection() as conn:  # a worker still on RabbitMQ: holds one delivery
        channel = conn.channel()
        channel.basic_qos(0, 1, False)
        channel.basic_consume(short, callback=lambda message: None)
        refused = run_migrate(env)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert "[rabbitmq]" in refused.stderr and short in refused.stderr
        assert "--force" in refused.stderr
        assert client.dbsize() == 0  # not even the lock or a binding
        forced = run_migrate(env, "--force", "--queue", short, "--json")
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert len(ids_in_redis(client, KombuLayout(), short)) == 4
    # The consumer's connection closed: its delivery is back in RabbitMQ; nothing lost.
    (left,) = drain_exact(stack, short)
    moved = set(ids_in_redis(client, KombuLayout(), short))
    assert moved | {left.properties["application_headers"]["id"]} == {m.task_id for m in messages}

    missing = run_migrate(env, "--queue", short + "-nope")
    assert missing.returncode == 3 and short + "-nope" in missing.stderr
    skipped = run_migrate(env, "--json")  # configured queues that do not exist: named, skipped
    assert skipped.returncode == 0, skipped.stderr
    done = json.loads(skipped.stdout.splitlines()[-1])
    assert {s["name"] for s in done["skipped"]} == set(queue_names[1:])


def test_malformed_message_stays_in_rabbitmq_byte_exact_and_is_reported(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    good = celery_messages(redis_url, spec, 3)
    not_celery = AmqpMessage(
        body=b"\x00\xffnot a task",
        properties={"application_headers": {"who": "someone else"}, "priority": 3},
        exchange="",
        routing_key=short,
    )
    # An AMQP timestamp header (as in x-death) is not malformed: it is written in kombu's own
    # typed JSON, which a Redis worker reads back as a datetime (issue 17).
    stamp = datetime(2026, 1, 2, 3, 4, 5)
    with_stamp = AmqpMessage(
        body=b'{"a": 1}',
        properties={"application_headers": {"task": "t", "id": "ts-1", "at": stamp}},
        exchange="",
        routing_key=short,
    )
    publish(stack, spec, [good[0], not_celery, good[1], with_stamp, good[2]])
    env = rollback_env(client_env, redis_url)
    report_file = tmp_path / "report.json"
    for attempt in range(2):  # a rerun finds it again, reports it again, does not loop
        started = time.monotonic()
        done = run_migrate(env, "--queue", short, "--report", str(report_file), timeout=60)
        assert done.returncode == 4, done.stdout + done.stderr
        assert time.monotonic() - started < 30
        report = json.loads(report_file.read_text())
        assert report["migrated"] == {short: 4 if attempt == 0 else 0}
        assert report["quarantined"] == 1 and report["complete"]
        reasons = " ".join(q["reason"] for q in report["quarantine"])
        assert "not a Celery protocol 2 task" in reasons
        kept = {base64.b64decode(h["body_base64"]) for h in report["left_in_rabbitmq"]}
        assert kept == {not_celery.body}
    client = redis.Redis.from_url(redis_url)
    assert sorted(ids_in_redis(client, KombuLayout(), short)) == sorted(
        [*(m.task_id or "" for m in good), "ts-1"]
    )
    from kombu.utils.json import loads as kombu_loads

    entries = [
        kombu_loads(raw) for key in client.keys(f"{short}*") for raw in client.lrange(key, 0, -1)
    ]
    (stamped,) = [e for e in entries if e["headers"]["id"] == "ts-1"]
    assert stamped["headers"]["at"] == stamp  # what a Redis worker reads
    left = drain_exact(stack, short)
    assert [body_of(m) for m in left] == [not_celery.body]
    assert left[0].properties["application_headers"] == {"who": "someone else"}


# -- the sink against kombu itself ----------------------------------------------------------------

LAYOUTS = [
    {},
    {"sep": ":", "priority_steps": list(range(10)), "global_keyprefix": "pfx:"},
]


@pytest.mark.parametrize("options", LAYOUTS, ids=["default", "sep-steps-prefix"])
def test_sink_writes_what_kombu_writes(redis_url: str, options: dict[str, Any]) -> None:
    """The same message through kombu's own Redis producer and through the sink: same list
    (priority bucket, separator, prefix), same envelope but for the fresh delivery_tag."""
    layout = KombuLayout.from_transport_options(options)
    spec = QueueSpec("kombu-made")
    client = redis.Redis.from_url(redis_url)
    sink = RedisSink(
        RedisSource.from_url(redis_url, layout), Journal(RedisSource.from_url(redis_url, layout))
    )
    with Connection(redis_url, transport_options=options) as conn:
        queue = spec.kombu_queue()(conn.default_channel)
        queue.declare()
        kombu_bindings = {k: client.smembers(k) for k in client.keys("*_kombu.binding*")}
        client.flushdb()
        sink.prepare(spec)
        assert {k: client.smembers(k) for k in client.keys("*_kombu.binding*")} == kombu_bindings
        producer = Producer(conn.default_channel)
        for priority in range(10):
            producer.publish(
                b"\x00body\xff",
                exchange=spec.exchange,
                routing_key=spec.routing_key,
                headers={"task": "t", "id": f"id-{priority}", "eta": None, "x": [1, {"y": 2.5}]},
                priority=priority,
                content_type="application/x-python-serialize",
                content_encoding="binary",
                correlation_id=f"id-{priority}",
                reply_to="reply",
            )
            (key,) = [k for k in client.keys("*") if client.type(k) == b"list"]
            kombu_made = client.lpop(key)
            assert kombu_made is not None
            entry = sink.encode(from_redis(kombu_made, layout), spec)
            assert entry.key == key.decode()
            ours, theirs = json.loads(entry.payload), json.loads(kombu_made)
            assert ours["properties"].pop("delivery_tag") != theirs["properties"].pop(
                "delivery_tag"
            )
            assert ours == theirs


def test_batch_and_its_journal_entry_are_one_transaction(redis_url: str) -> None:
    """Redis accepts a batch and the journal naming its ids at once: one MULTI/EXEC."""
    layout = KombuLayout()
    store = RedisSource.from_url(redis_url, layout)
    journal = Journal(store)
    sink = RedisSink(store, journal)
    spec = QueueSpec("journalled", max_priority=MAX_PRIORITY)
    client = redis.Redis.from_url(redis_url)
    messages = [
        TaskMessage(body=b"x", headers={"task": "t", "id": f"j{i}"}, priority=p, bucket=p)
        for i, p in enumerate([0, 0, 3, 0, 9])
    ]
    journal.mark("journalled", [m.task_id or "" for m in messages])
    assert not client.exists(store.own(INFLIGHT))  # staged, not written before the batch

    def calls() -> dict[str, int]:
        stats = client.info("commandstats")
        return {c: stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("multi", "exec", "set")}

    before = calls()
    sink.send([sink.encode(m, spec) for m in messages])
    after = calls()
    assert {c: after[c] - before[c] for c in after} == {"multi": 1, "exec": 1, "set": 1}
    assert json.loads(client.get(store.own(INFLIGHT)) or "{}")["ids"] == [
        "j0",
        "j1",
        "j2",
        "j3",
        "j4",
    ]
    # runs of one bucket in one LPUSH each, oldest consumed first
    bucket0 = reversed(client.lrange("journalled", 0, -1))
    assert [json.loads(r)["headers"]["id"] for r in bucket0] == ["j0", "j1", "j3"]
    journal.committed(keep=False)
    assert not client.exists(store.own(INFLIGHT))


def test_held_messages_beyond_the_window_do_not_stall_the_queue(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Held (never acknowledged) deliveries count against the prefetch: three times the
    window of them, interleaved with good ones, and every good one still moves."""
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    good = celery_messages(redis_url, spec, 12)
    bad = [
        AmqpMessage(body=f"bad {i}".encode(), properties={}, exchange="", routing_key=short)
        for i in range(12)
    ]
    publish(stack, spec, [m for pair in zip(bad, good, strict=True) for m in pair])
    report_file = tmp_path / "report.json"
    env = rollback_env(client_env, redis_url)
    done = run_migrate(env, "--queue", short, "--batch-size", "4", "--report", str(report_file))
    assert done.returncode == 4, done.stdout + done.stderr
    report = json.loads(report_file.read_text())
    assert report["migrated"] == {short: 12} and report["quarantined"] == 12
    client = redis.Redis.from_url(redis_url)
    assert ids_in_redis(client, KombuLayout(), short) == [m.task_id for m in good][::-1]
    assert sorted(body_of(m) for m in drain_exact(stack, short)) == sorted(m.body for m in bad)


def test_errors_name_the_side_and_leave_everything_in_rabbitmq(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    publish(stack, spec, celery_messages(redis_url, spec, 2))
    env = rollback_env(client_env, redis_url)
    password = stack.broker_account.password
    wrong_amqp = {
        **env,
        "PACKIT_MIGRATE_FROM": env["PACKIT_MIGRATE_FROM"].replace(password, "nope-nope"),
    }
    denied = run_migrate(wrong_amqp)
    assert denied.returncode == 1, denied.stderr
    assert "[amqp-login] RabbitMQ" in denied.stderr and "nope-nope" not in denied.stderr
    assert "still in RabbitMQ" in denied.stderr
    wrong_redis = redis_url.replace(redis_url.split("@")[0], "redis://:wrong-password")
    failed = run_migrate({**env, "PACKIT_MIGRATE_TO": wrong_redis})
    assert failed.returncode == 1, failed.stderr
    assert "[redis-login] Redis" in failed.stderr and "wrong-password" not in failed.stderr
    # A forward bridge (or another rollback) holds the run lock of this Redis: refused.
    lock = RunLock(RedisSource.from_url(redis_url, KombuLayout()))
    lock.acquire()
    try:
        locked = run_migrate(env, "--queue", short)
    finally:
        lock.release()
    assert locked.returncode == 3, locked.stderr
    assert "another migration or rollback" in locked.stderr
    assert queue_depth(stack, short) == 2  # nothing moved, nothing lost
    for output in (denied, failed, locked):
        assert password not in output.stdout + output.stderr
        assert stack.redis_password not in output.stdout + output.stderr


def test_quorum_queues_roll_back(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    """Quorum queues (per-consumer prefetch only, no priorities): all back, FIFO kept."""
    env = {**client_env, "PACKIT_BROKER_QUEUE_TYPE": "quorum"}
    app = backlog.producer(redis_url, queue_names)
    ids = [backlog.send(app, queue_names[1], f"q{i}") for i in range(5)]
    forward = run_migrate(env, "--from", redis_url)
    assert forward.returncode == 0, forward.stderr
    back_env = rollback_env(env, redis_url)
    del back_env["PACKIT_BROKER_MAX_PRIORITY"]
    done = run_migrate(back_env, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["migrated"][queue_names[1]] == 5
    client = redis.Redis.from_url(redis_url)
    assert ids_in_redis(client, KombuLayout(), queue_names[1]) == ids[::-1]
    assert queue_depth(stack, queue_names[1]) == 0


def test_a_queue_that_looked_empty_too_early_is_swept_again(
    stack: Stack, queue_names: tuple[str, str, str], redis_url: str
) -> None:
    """A delivery can reach us after RabbitMQ reported the queue empty and the settle time
    passed (a loaded broker). Simulated: the first time the lane is read after 40 messages,
    it looks empty; the run goes over lanes still holding something again, nothing is left."""
    short = queue_names[0]
    settings_ = QueueSettings(names=(short,), max_priority=MAX_PRIORITY)
    messages = celery_messages(redis_url, settings_.spec(short), 100)
    publish(stack, settings_.spec(short), messages)
    store = RedisSource.from_url(redis_url, KombuLayout())
    options = RollbackOptions(queues=(short,), batch_size=20)
    with Rollback(broker_from_env(stack.broker_env()), store, settings_, options) as rollback:
        real_read, reads = rollback.source.read, []

        def looks_empty_once(lane: Any, skip: int, count: int) -> Any:
            reads.append(count)
            if len(reads) in (5, 6):  # after 4 reads of 10, until nothing is in flight
                return []
            return real_read(lane, skip, count)

        rollback.source.read = looks_empty_once  # type: ignore[method-assign]
        report = rollback.run(rollback.plan())
    assert report.migrated == {short: 100} and report.complete
    assert sorted(ids_in_redis(redis.Redis.from_url(redis_url), KombuLayout(), short)) == sorted(
        m.task_id or "" for m in messages
    )


# -- what "accepted by Redis" is worth ------------------------------------------------------------


def test_rollback_says_what_redis_acceptance_is_worth(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """RabbitMQ forgets a message once Redis accepted it: without AOF that is memory only. The
    run says so loudly (naming the CONFIG SET fix) and the report records the level; with
    `appendfsync always` there is no warning."""
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    env = rollback_env(client_env, redis_url)
    admin = redis.Redis.from_url(redis_url)
    results = {}
    try:
        for appendonly, appendfsync in (("no", "everysec"), ("yes", "everysec"), ("yes", "always")):
            admin.config_set("appendonly", appendonly)
            admin.config_set("appendfsync", appendfsync)
            publish(stack, spec, celery_messages(redis_url, spec, 5))
            report_file = tmp_path / f"report-{appendonly}-{appendfsync}.json"
            done = run_migrate(env, "--queue", short, "--report", str(report_file))
            assert done.returncode == 0, done.stderr
            level = json.loads(report_file.read_text())["redis_durability"]
            results[level] = done.stderr
    finally:
        admin.config_set("appendonly", "no")
        admin.config_set("appendfsync", "everysec")
    assert set(results) == {"memory", "aof-everysec", "fsync-always"}
    assert "in memory only (appendonly no)" in results["memory"]
    assert "CONFIG SET appendfsync always" in results["memory"]
    assert "host can lose up to about a second" in results["aof-everysec"]
    assert "WARNING" not in results["fsync-always"]


class ReplyLosingProxy:
    """A TCP proxy to Redis that lets the first EXEC through, then drops the connection before
    its reply reaches the client: Redis applied the transaction, the client cannot know."""

    def __init__(self, upstream_port: int) -> None:
        import socket
        import threading

        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            lost = threading.Event()  # this connection's EXEC reply is being lost
            threading.Thread(target=self._up, args=(client, upstream, lost), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, lost), daemon=True).start()

    def _up(self, client: Any, upstream: Any, lost: Any) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                losing = b"EXEC" in data and not self.dropped.is_set()
                if losing:
                    lost.set()  # from now on nothing goes back to this client
                    self.dropped.set()
                upstream.sendall(data)
                if losing:
                    time.sleep(0.3)  # Redis runs the transaction meanwhile
                    client.close()
                    upstream.close()
                    return

    def _down(self, upstream: Any, client: Any, lost: Any) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if lost.is_set():
                    return
                client.sendall(data)

    def close(self) -> None:
        self.listener.close()


def test_a_lost_exec_reply_is_not_sent_again(redis_url: str) -> None:
    """redis-py 6 retries a MULTI/EXEC whose reply was lost: the batch would be written twice
    and, the run carrying on, its journal deleted - a duplicate no report lists. The client
    the migrator builds must fail instead, leaving the journal written with the batch."""
    prefix, _, tail = redis_url.rpartition(":")
    port, _, db = tail.partition("/")
    proxy = ReplyLosingProxy(int(port))
    try:
        store = RedisSource.from_url(f"{prefix}:{proxy.port}/{db}", KombuLayout())
        journal = Journal(store)
        sink = RedisSink(store, journal)
        journal.mark("celery", ["t1", "t2"])
        with pytest.raises(redis.ConnectionError):
            sink.send([RedisEntry("lost-reply", b"m1"), RedisEntry("lost-reply", b"m2")])
        assert proxy.dropped.is_set()
    finally:
        proxy.close()
    direct = redis.Redis.from_url(redis_url)
    assert direct.lrange("lost-reply", 0, -1) == [b"m2", b"m1"]  # once, not twice
    assert b"t1" in (direct.get(journal.key) or b"")  # the journal names the batch


def test_a_destination_of_another_layout_is_refused_before_anything_moves(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    """The Redis app uses a key prefix and another separator, the operator forgot its
    transport options: writing would put tasks where no Redis worker reads. Refused (exit 3,
    side Redis, the fix named), in the plan too; a target key of another type likewise;
    RabbitMQ keeps every message."""
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    messages = celery_messages(redis_url, spec, 5)
    publish(stack, spec, messages)
    env = rollback_env(client_env, redis_url)
    theirs = KombuLayout.from_transport_options(LAYOUTS[1])
    their_sink = RedisSink(
        RedisSource.from_url(redis_url, theirs), Journal(RedisSource.from_url(redis_url, theirs))
    )
    their_sink.prepare(spec)
    their_sink.send([their_sink.encode(TaskMessage(messages[0].body, messages[0].headers), spec)])

    planned = run_migrate(env, "--queue", short, "--dry-run")
    assert planned.returncode == 3, planned.stdout + planned.stderr
    assert "the transport options do not fit Redis" in planned.stdout
    refused = run_migrate(env, "--queue", short)
    assert refused.returncode == 3, refused.stderr
    assert "refused: [redis]" in refused.stderr and "global_keyprefix" in refused.stderr
    assert "PACKIT_MIGRATE_TRANSPORT_OPTIONS" in refused.stderr

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.set(short, b"not a list")
    wrong = run_migrate(env, "--queue", short)
    assert wrong.returncode == 3, wrong.stderr
    assert f"{short!r} is a Redis string, not a list" in wrong.stderr
    assert len(drain_exact(stack, short)) == len(messages)  # nothing left RabbitMQ


def test_redelivered_messages_are_listed_apart(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    """A message RabbitMQ redelivers was with a consumer before (a worker, perhaps mid-task,
    or an earlier run whose ack a crashed node lost after that run's journal was cleared): the
    task may have started, or be in Redis already. The run lists it, and only it, under
    `redelivered` - apart from the journal's possible duplicates - written with its batch so a
    crash right after keeps the list for the next run's report."""
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    seen = celery_messages(redis_url, spec, 4)
    publish(stack, spec, seen)
    with stack.amqp_connection() as conn:  # a consumer takes them and goes away unacked
        channel = conn.channel()
        channel.basic_qos(0, 10, False)
        taken: list[amqp.Message] = []
        channel.basic_consume(short, callback=taken.append)
        deadline = time.monotonic() + 30
        while len(taken) < len(seen):
            assert time.monotonic() < deadline, f"only {len(taken)} delivered"
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
    deadline = time.monotonic() + 30
    while queue_depth(stack, short) < len(seen):  # requeued once its connection is gone
        assert time.monotonic() < deadline, "RabbitMQ did not requeue the unacked messages"
        time.sleep(0.1)
    fresh = celery_messages(redis_url, spec, 3)
    publish(stack, spec, fresh)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    env = rollback_env(client_env, redis_url)
    done = run_migrate(env, "--queue", short, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert sorted(report["redelivered"]) == sorted(m.task_id for m in seen), done.stdout
    assert report["possible_duplicates"] == []  # the journal's list: in flight at a crash
    assert set(ids_in_redis(client, KombuLayout(), short)) == {m.task_id for m in seen + fresh}
    # Written with the batch, then cleared once the report said it.
    assert client.llen("packit_broker.redelivered") == 0
    human = run_migrate(env, "--queue", short)  # nothing left: nothing listed
    assert human.returncode == 0 and "redelivered" not in human.stdout


def test_rollback_without_the_queues_max_priority_is_refused(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
) -> None:
    """A priority queue rolled back without PACKIT_BROKER_MAX_PRIORITY would put its 0..10 in
    one Redis bucket (issue 17: exit 0 before); it is refused, naming the setting."""
    short = queue_names[0]
    spec = QueueSettings(names=queue_names, max_priority=MAX_PRIORITY).spec(short)
    messages = celery_messages(redis_url, spec, 3)
    publish(stack, spec, messages)
    env = rollback_env(client_env, redis_url)
    del env["PACKIT_BROKER_MAX_PRIORITY"]
    dry = run_migrate(env, "--queue", short, "--dry-run")
    refused = run_migrate(env, "--queue", short)
    assert dry.returncode == refused.returncode == 3, refused.stdout + refused.stderr
    assert "PACKIT_BROKER_MAX_PRIORITY" in refused.stderr and "x-max-priority" in refused.stderr
    assert queue_depth(stack, short) == len(messages)  # nothing moved
    done = run_migrate(rollback_env(client_env, redis_url), "--queue", short)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(ids_in_redis(redis.Redis.from_url(redis_url), KombuLayout(), short)) == sorted(
        m.task_id or "" for m in messages
    )
