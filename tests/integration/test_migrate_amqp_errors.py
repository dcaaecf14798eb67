"""Issue 9: errors on the right side with the right fix, and a poison message isolated.

Every fault is real: a queue declared with other arguments, a memory alarm set on the node,
max_message_size lowered on the node, a reject-publish policy, a real read-only replica, a
second client popping the list mid-run.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from packit_broker.config import broker_from_env
from packit_broker.envelope import AmqpMessage
from packit_broker.migrate.amqp_sink import AmqpSink
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process, free_port, require, wait_until
from tests.integration import backlog
from tests.integration.rabbitmqctl import max_message_size, memory_alarm, policy
from tests.integration.test_migrate import drain, queue_depth, run_migrate
from tests.integration.test_migrate_follow import start_bridge, wait_for_notice

pytestmark = pytest.mark.integration


def fill(redis_url: str, queue: str, count: int) -> list[str]:
    """`count` real Celery tasks in `queue`, oldest first."""
    app = backlog.producer(redis_url, [queue])
    client = redis.Redis.from_url(redis_url)
    first = backlog.send(app, queue, "0")
    template = client.lindex(queue, 0)
    assert template is not None
    return [first, *backlog.clone_many(client, queue, template, [str(i) for i in range(1, count)])]


def ids_in(stack: Stack, queue: str) -> list[str]:
    return [m.properties["application_headers"]["id"] for m in drain(stack, queue)]


def assert_secret_free(stack: Stack, text: str) -> None:
    assert stack.broker_account.password not in text
    assert stack.redis_password not in text


# -- RabbitMQ: a queue that exists with other arguments ------------------------------------


def test_queue_with_other_arguments_shows_existing_and_wanted(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    queue = queue_names[0]
    fill(redis_url, queue, 3)
    with stack.amqp_connection() as conn:
        conn.channel().queue_declare(
            queue, durable=True, auto_delete=False, arguments={"x-max-priority": 5}
        )
    done = run_migrate(client_env, "--from", redis_url, "--queue", queue)
    assert done.returncode == 1, done.stderr
    assert "[queue-arguments] RabbitMQ" in done.stderr
    assert "exists with arguments {'x-max-priority': 5}" in done.stderr
    assert "wants {}" in done.stderr
    assert "PACKIT_BROKER_MAX_PRIORITY" in done.stderr
    assert redis.Redis.from_url(redis_url).llen(queue) == 3
    assert_secret_free(stack, done.stderr)


# -- RabbitMQ: resource alarms ---------------------------------------------------------------


def test_memory_alarm_fails_after_blocked_timeout_naming_it(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    queue = queue_names[0]
    expected = fill(redis_url, queue, 500)
    with memory_alarm(stack):
        started = time.monotonic()
        done = run_migrate(
            client_env, "--from", redis_url, "--queue", queue, "--blocked-timeout", "3"
        )
        took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "[resource-alarm] RabbitMQ" in done.stderr
    # Said at once, not only when --blocked-timeout is spent.
    assert "BLOCKED by RabbitMQ" in done.stdout + done.stderr
    assert "low on memory" in done.stderr and "memory alarm" in done.stderr
    assert "[tls]" not in done.stderr and "handshake" not in done.stderr
    assert "nothing was lost" in done.stderr
    assert took < 60, "the blocked timeout was not honoured"
    assert_secret_free(stack, done.stderr)
    assert redis.Redis.from_url(redis_url).llen(queue) == len(expected)
    report_file = tmp_path / "report.json"
    again = run_migrate(
        client_env, "--from", redis_url, "--queue", queue, "--report", str(report_file)
    )
    assert again.returncode == 0, again.stderr
    # RabbitMQ reads what is already on the wire before it blocks: those may now be queued
    # unconfirmed, so they are published again and reported, never lost.
    delivered = collections.Counter(ids_in(stack, queue))
    assert set(delivered) == set(expected)
    twice = {task_id for task_id, n in delivered.items() if n > 1}
    assert twice <= set(json.loads(report_file.read_text())["possible_duplicates"])


def test_memory_alarm_with_large_messages_is_named_not_taken_for_the_network(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    """64 KB tasks: a blocked publisher's socket is no longer read by RabbitMQ, so a batch of
    them fills the buffers and a write stalls. The run must still see the alarm (it reads
    what RabbitMQ sent between writes), wait --blocked-timeout and name it - not hang, not
    report a dead network - and a rerun after the alarm moves everything."""
    queue = queue_names[0]
    padding = "x" * 60000  # under FENCE_ABOVE: published in a stream, not one by one
    app = backlog.producer(redis_url, [queue])
    client = redis.Redis.from_url(redis_url)
    first = backlog.send(app, queue, "0" + padding)
    template = client.lindex(queue, 0)
    assert template is not None
    labels = [f"{i}{padding}" for i in range(1, 400)]
    expected = [first, *backlog.clone_many(client, queue, template, labels)]
    with memory_alarm(stack):
        started = time.monotonic()
        done = run_migrate(
            client_env, "--from", redis_url, "--queue", queue, "--blocked-timeout", "5",
            timeout=120,
        )  # fmt: skip
        took = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[resource-alarm] RabbitMQ" in done.stderr and "low on memory" in done.stderr
    assert "LOST" not in done.stdout + done.stderr and "[tcp]" not in done.stderr
    assert took < 60, f"the blocked timeout was not honoured: {took:.0f} s"
    assert client.llen(queue) == len(expected)
    again = run_migrate(client_env, "--from", redis_url, "--queue", queue)
    assert again.returncode == 0, again.stderr
    assert set(ids_in(stack, queue)) == set(expected)


def test_memory_alarm_lifted_within_blocked_timeout_is_waited_out(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    queue = queue_names[0]
    expected = fill(redis_url, queue, 300)
    with memory_alarm(stack):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "packit_broker",
                "migrate",
                "--from",
                redis_url,
                "--queue",
                queue,
                "--blocked-timeout",
                "120",
            ],
            env={**os.environ, **client_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(8)  # long enough for the run to publish and be blocked
        assert proc.poll() is None, proc.communicate()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert ids_in(stack, queue) == expected


# -- RabbitMQ: max_message_size ----------------------------------------------------------------


def test_large_message_over_max_message_size_is_quarantined_alone(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Large bodies are published fenced (alone, after the rest is confirmed): when RabbitMQ
    closes the channel over one, only that one is refused, and nothing is doubled."""
    queue = queue_names[0]
    app = backlog.producer(redis_url, [queue])
    small = [backlog.send(app, queue, f"small-{i}") for i in range(5)]
    big = backlog.send(app, queue, "x" * 300_000)
    later = [backlog.send(app, queue, f"after-{i}") for i in range(5)]
    report_file = tmp_path / "report.json"
    with max_message_size(stack, 200_000):
        done = run_migrate(
            client_env, "--from", redis_url, "--queue", queue, "--report", str(report_file)
        )
    assert done.returncode == 4, done.stderr  # done, one quarantined
    assert ids_in(stack, queue) == [*small, *later]
    report = json.loads(report_file.read_text())
    [reason] = [q["reason"] for q in report["quarantine"]]
    assert reason.startswith("RabbitMQ refused it: its body of 3")
    assert "is larger than the broker's max_message_size 200000" in reason
    assert report["possible_duplicates"] == []
    quarantine = redis.Redis.from_url(redis_url).lrange("packit_broker.quarantine", 0, -1)
    assert [json.loads(raw)["headers"]["id"] for raw in quarantine] == [big]


def test_message_over_a_small_max_message_size_is_named_with_the_limit(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """Below the fence RabbitMQ closes the channel mid-window: the run stops naming the message
    and the limit, and the rerun with --max-message-size finishes, reporting what may repeat."""
    queue = queue_names[0]
    app = backlog.producer(redis_url, [queue])
    small = [backlog.send(app, queue, f"small-{i}") for i in range(5)]
    big = backlog.send(app, queue, "x" * 5_000)
    later = backlog.send(app, queue, "after")
    with max_message_size(stack, 2_000):
        done = run_migrate(client_env, "--from", redis_url, "--queue", queue)
        assert done.returncode == 1, done.stderr
        assert "[message-size] RabbitMQ" in done.stderr
        assert f"task {big}" in done.stderr
        assert "max_message_size 2000" in done.stderr
        assert "--max-message-size 2000" in done.stderr
        assert_secret_free(stack, done.stderr)
        report_file = tmp_path / "report.json"
        again = run_migrate(
            client_env,
            "--from",
            redis_url,
            "--queue",
            queue,
            "--max-message-size",
            "2000",
            "--report",
            str(report_file),
        )
    assert again.returncode == 4, again.stderr  # done, one quarantined
    delivered = collections.Counter(ids_in(stack, queue))
    assert set(delivered) == {*small, later}
    # RabbitMQ closes the channel at the large message: what went before it may be in the
    # queue unconfirmed, so it is republished and reported, never lost.
    twice = {task_id for task_id, n in delivered.items() if n > 1}
    assert twice <= set(json.loads(report_file.read_text())["possible_duplicates"])
    quarantine = redis.Redis.from_url(redis_url).lrange("packit_broker.quarantine", 0, -1)
    assert [json.loads(raw)["headers"]["id"] for raw in quarantine] == [big]


# -- RabbitMQ: a poison message is isolated ---------------------------------------------------


def test_message_rabbitmq_nacks_alone_is_quarantined_rest_committed(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """A reject-publish length limit that only one (large) message exceeds: RabbitMQ nacks it
    alone, on every rerun. Before: the whole batch failed every time."""
    queue = queue_names[0]
    app = backlog.producer(redis_url, [queue])
    before = [backlog.send(app, queue, f"before-{i}") for i in range(20)]
    poison = backlog.send(app, queue, "p" * 300_000)
    after = [backlog.send(app, queue, f"after-{i}") for i in range(20)]
    raw_poison = redis.Redis.from_url(redis_url).lindex(queue, len(after))
    limit = json.dumps({"max-length-bytes": 200_000, "overflow": "reject-publish"})
    report_file = tmp_path / "report.json"
    with policy(stack, f"poison-{queue}", f"^{queue}$", limit):
        done = run_migrate(
            client_env, "--from", redis_url, "--queue", queue, "--report", str(report_file),
            "--nack-retry-seconds", "2",
        )  # fmt: skip
        assert done.returncode == 4, done.stderr
        assert ids_in(stack, queue) == [*before, *after]
    report = json.loads(report_file.read_text())
    assert report["quarantined"] == 1
    assert "basic.nack" in report["quarantine"][0]["reason"]
    assert "reject-publish" in report["quarantine"][0]["reason"]
    assert report["migrated"][queue] == 40
    client = redis.Redis.from_url(redis_url)
    assert client.llen(queue) == 0
    assert client.lrange("packit_broker.quarantine", 0, -1) == [raw_poison]
    assert json.loads(raw_poison)["headers"]["id"] == poison


def test_sink_attributes_a_returned_message_to_its_index(
    stack: Stack, queue_names: tuple[str, str, str]
) -> None:
    """Returns carry no delivery tag: the sink finds the message RabbitMQ returned."""
    queue = queue_names[0]
    with stack.amqp_connection() as conn:
        conn.channel().queue_declare(queue, durable=True, auto_delete=False)

    def message(routing_key: str, body: bytes) -> AmqpMessage:
        properties = {"delivery_mode": 2, "content_encoding": "utf-8"}
        return AmqpMessage(body, properties, "", routing_key)

    batch = [
        message(queue, b"one"),
        message(f"{queue}-nowhere", b"lost?"),
        message(queue, b"two"),
        message(f"{queue}-nowhere", b"lost?"),
    ]
    with AmqpSink(broker_from_env(stack.broker_env())) as sink:
        first = sink.send(batch[:2])
        second = sink.send(batch[2:])
        assert [r.index for r in sink.wait(second)] == [1]
        refused = sink.wait(first)
    assert [r.index for r in refused] == [1]
    assert "NO_ROUTE" in refused[0].reason and f"{queue}-nowhere" in refused[0].reason
    assert [m.body for m in drain(stack, queue)] == ["one", "two"]  # decoded as utf-8


# -- Redis: a read-only replica, another writer ----------------------------------------------


@pytest.fixture
def redis_replica(stack: Stack, redis_url: str) -> Iterator[str]:
    """A real replica of the stack's Redis (`replicaof`), as a URL for the same database."""
    port = free_port()
    folder = stack.root / f"replica-{port}"
    folder.mkdir()
    conf = folder / "redis.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\nrequirepass {stack.redis_password}\n"
        f"masterauth {stack.redis_password}\nreplicaof 127.0.0.1 {stack.redis_port}\n"
        f'save ""\nappendonly no\ndir {folder}\n'
    )
    proc = Process("replica", [require("redis-server", "redis-server"), str(conf)], folder / "log")
    proc.start()
    db = redis_url.rsplit("/", 1)[1]
    url = f"redis://:{stack.redis_password}@127.0.0.1:{port}/{db}"

    def synced() -> bool:
        try:
            info = redis.Redis.from_url(url).info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up"

    try:
        wait_until(synced, proc, 30, "redis replica")
        yield url
    finally:
        proc.stop()


def test_read_only_replica_is_named_with_the_fix(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    redis_replica: str,
) -> None:
    queue = queue_names[0]
    fill(redis_url, queue, 10)
    replica = redis.Redis.from_url(redis_replica)
    deadline = time.monotonic() + 10
    while replica.llen(queue) != 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    done = run_migrate(client_env, "--from", redis_replica, "--queue", queue)
    assert done.returncode == 1, done.stderr
    assert "[redis-replica] Redis" in done.stderr
    assert "read-only replica" in done.stderr and "primary" in done.stderr
    assert "amqps://" not in done.stderr.split("fix:")[0]  # not blamed on RabbitMQ
    assert_secret_free(stack, done.stderr)
    assert queue_depth(stack, queue) <= 0  # nothing was published
    assert redis.Redis.from_url(redis_url).llen(queue) == 10


def test_another_client_popping_the_list_is_named(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    """A polling RPOP consumer is refused like any live client (see test_migrate_workers); an
    operator who forces the run past it gets the digest-checked trim naming the changed tail."""
    queue = queue_names[0]
    expected = set(fill(redis_url, queue, 20_000))
    stolen: list[bytes] = []
    stop = threading.Event()

    def thief() -> None:
        client = redis.Redis.from_url(redis_url)
        while not stop.is_set():
            raw = client.rpop(queue)
            if raw is not None:
                stolen.append(raw)
            time.sleep(0.002)

    worker = threading.Thread(target=thief)
    worker.start()
    try:
        done = run_migrate(
            client_env, "--from", redis_url, "--queue", queue, "--batch-size", "200", "--force"
        )
    finally:
        stop.set()
        worker.join()
    assert done.returncode == 1, done.stderr
    assert "[concurrent-writer] Redis" in done.stderr
    assert "another client popped or trimmed it" in done.stderr
    assert "stop every Celery worker" in done.stderr
    client = redis.Redis.from_url(redis_url)
    left = {json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)}
    taken = {json.loads(raw)["headers"]["id"] for raw in stolen}
    delivered = set(ids_in(stack, queue))
    assert left | taken | delivered == expected, "a message vanished"


# -- RabbitMQ: a queue that refuses everything for a while (no leader, full) ------------------

REFUSE_ALL = json.dumps({"max-length": 0, "overflow": "reject-publish"})


def test_queue_refusing_everything_fails_the_run_and_leaves_redis_whole(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    """Every message nacked and none accepted through the retry window: that is a queue that is
    unavailable (no quorum leader, or full), not a batch of poison messages. Quarantining them
    would strand healthy tasks; the run fails naming the queue and nothing leaves Redis."""
    queue = queue_names[0]
    ids = fill(redis_url, queue, 30)
    client = redis.Redis.from_url(redis_url)
    before = client.lrange(queue, 0, -1)
    with policy(stack, f"refuse-{queue}", f"^{queue}$", REFUSE_ALL):
        done = run_migrate(
            client_env, "--from", redis_url, "--queue", queue, "--nack-retry-seconds", "1"
        )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[queue-unavailable] RabbitMQ" in done.stderr
    assert f"every message for {queue!r}" in done.stderr
    assert client.lrange(queue, 0, -1) == before  # all of it still in Redis, byte-exact
    assert client.llen("packit_broker.quarantine") == 0
    assert queue_depth(stack, queue) == 0
    assert_secret_free(stack, done.stdout + done.stderr)
    assert len(ids) == 30


def test_refusals_that_pass_within_the_retry_window_deliver_everything_in_order(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    """A queue that refuses for a few seconds (as a quorum queue does while it elects a new
    leader) and then accepts: every message arrives, in order, none is quarantined."""
    queue = queue_names[0]
    ids = fill(redis_url, queue, 50)
    with policy(stack, f"refuse-{queue}", f"^{queue}$", REFUSE_ALL):
        running = subprocess.Popen(
            [sys.executable, "-m", "packit_broker", "migrate", "--from", redis_url,
             "--queue", queue, "--nack-retry-seconds", "60"],
            env={**os.environ, **client_env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while queue_depth(stack, queue) < 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # declared: publishing (and being refused) has begun
        time.sleep(2)
    out, err = running.communicate(timeout=120)
    assert running.returncode == 0, out + err
    assert ids_in(stack, queue) == ids
    assert redis.Redis.from_url(redis_url).llen("packit_broker.quarantine") == 0


def test_follow_waits_out_a_queue_refusing_everything(
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    """A bridge must outlive a quorum queue's leaderless spell: with --follow, a queue that
    nacks everything through --nack-retry-seconds pauses the run (loudly) and it tries again
    over a new connection, instead of exiting; once the queue accepts, every task arrives in
    order, none quarantined, what was in flight listed."""
    queue = queue_names[0]
    ids = fill(redis_url, queue, 30)
    report_file = tmp_path / "report.json"
    with policy(stack, f"refuse-{queue}", f"^{queue}$", REFUSE_ALL):
        bridge = start_bridge(
            client_env, redis_url, "--queue", queue, "--until-idle", "3",
            "--nack-retry-seconds", "1", "--report", str(report_file),
        )  # fmt: skip
        try:
            notice = wait_for_notice(bridge, "PAUSED")
            assert f"every message for {queue!r}" in notice and "until stopped" in notice
            wait_for_notice(bridge, "reconnected")  # and refused again: still running
            time.sleep(2)
            assert bridge.poll() is None, bridge.communicate()
            assert queue_depth(stack, queue) == 0
        except BaseException:
            bridge.kill()
            raise
    out, err = bridge.communicate(timeout=120)
    assert bridge.returncode == 0, out + err
    assert ids_in(stack, queue) == ids
    report = json.loads(report_file.read_text())
    assert report["quarantined"] == 0 and report["complete"]
    assert redis.Redis.from_url(redis_url).llen(queue) == 0
    assert_secret_free(stack, out + err)
