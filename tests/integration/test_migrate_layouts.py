"""Issue 9: migrate reads kombu's layout as the app configured it, and refuses what it cannot
place - before touching anything. Real Celery producers with those transport options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from packit_broker.stack import Stack
from tests.integration import backlog
from tests.integration.test_migrate import drain, queue_depth, run_migrate

pytestmark = pytest.mark.integration
MIXED = [9, 0, 6, 3, 0, 9, 3, 6]  # priorities in sending order
BUCKET_ORDER = ["p0-1", "p0-4", "p3-3", "p3-6", "p6-2", "p6-7", "p9-0", "p9-5"]


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    return {key: client.dump(key) for key in client.keys("*")}


def labels(stack: Stack, queue: str) -> list[str]:
    """The task labels now in `queue`, in delivery order (first positional argument)."""
    out = []
    for message in drain(stack, queue):
        body = message.body if isinstance(message.body, str) else message.body.decode()
        out.append(json.loads(body)[0][0].split(":", 1)[1])
    return out


def send_mixed(app: object, queue: str) -> None:
    for i, prio in enumerate(MIXED):
        backlog.send(app, queue, f"{queue}:p{prio}-{i}", priority=prio)  # type: ignore[arg-type]


def test_sep_colon_is_refused_until_configured_then_every_bucket_moves(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    short = queue_names[0]
    client = redis.Redis.from_url(redis_url)
    send_mixed(backlog.producer(redis_url, queue_names, {"sep": ":"}), short)
    assert client.llen(f"{short}:3") == 2  # kombu's own layout with sep=':'
    before = snapshot(client)

    refused = run_migrate(client_env, "--from", redis_url)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert '"sep": ":"' in refused.stderr and "--transport-options" in refused.stderr
    assert snapshot(client) == before
    assert queue_depth(stack, f"{short}:3") == -1 and queue_depth(stack, short) == -1
    dry = run_migrate(client_env, "--from", redis_url, "--dry-run")
    assert dry.returncode == 3 and "sep" in dry.stdout

    done = run_migrate(client_env, "--from", redis_url, "--transport-options", '{"sep": ":"}')
    assert done.returncode == 0, done.stdout + done.stderr
    assert labels(stack, short) == BUCKET_ORDER
    assert queue_depth(stack, f"{short}:3") == -1
    assert not [k for k in client.keys(f"{short}*") if client.type(k) == b"list"]


def test_priority_steps_of_ten_from_the_environment(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    short = queue_names[0]
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names, {"priority_steps": list(range(10))})
    order = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]
    for prio in order:
        backlog.send(app, short, f"{short}:p{prio}", priority=prio)
    before = snapshot(client)
    refused = run_migrate(client_env, "--from", redis_url)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "priority_steps" in refused.stderr
    assert snapshot(client) == before

    env = {
        **client_env,
        "PACKIT_MIGRATE_TRANSPORT_OPTIONS": '{"priority_steps": [0,1,2,3,4,5,6,7,8,9]}',
    }
    done = run_migrate(env, "--from", redis_url, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["migrated"][short] == 10
    assert labels(stack, short) == [f"p{p}" for p in range(10)]


def test_prefix_and_unacked_keys_of_the_app(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    short = queue_names[0]
    options = {
        "global_keyprefix": "app1:",
        "unacked_key": "app1_unacked",
        "unacked_index_key": "app1_unacked_index",
    }
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names, options)
    for i in range(3):
        backlog.send(app, short, f"{short}:plain-{i}")
    backlog.kill_consumer_with_options(redis_url, short, 1, options)
    assert client.hlen("app1:app1_unacked") == 1
    backlog.backdate_index(client, "app1:app1_unacked_index", 7200)
    before = snapshot(client)

    refused = run_migrate(client_env, "--from", redis_url)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "global_keyprefix" in refused.stderr and "'app1:'" in refused.stderr
    assert snapshot(client) == before

    done = run_migrate(
        client_env, "--from", redis_url, "--transport-options", json.dumps(options), "--json"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["migrated"] == {short: 3, queue_names[1]: 0, queue_names[2]: 0}
    assert report["unacked_migrated"] == 1
    assert labels(stack, short) == ["plain-0", "plain-1", "plain-2"]
    assert client.hlen("app1:app1_unacked") == 0 and client.llen(f"app1:{short}") == 0


def test_unknown_transport_option_is_a_usage_error(
    client_env: dict[str, str], redis_url: str
) -> None:
    bad = run_migrate(client_env, "--from", redis_url, "--transport-options", '{"prio_steps": [0]}')
    assert bad.returncode == 2 and "prio_steps" in bad.stderr
    typed = run_migrate(
        {**client_env, "PACKIT_MIGRATE_TRANSPORT_OPTIONS": '{"sep": 1}'}, "--from", redis_url
    )
    assert typed.returncode == 2 and "sep must be a string" in typed.stderr


def test_queue_that_is_nowhere_is_refused_and_not_declared(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    backlog.send(backlog.producer(redis_url, queue_names), queue_names[0], "x:stays")
    before = snapshot(client)
    typo = queue_names[0] + "-typo"
    refused = run_migrate(client_env, "--from", redis_url, "--queue", typo)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert typo in refused.stderr and "nowhere in Redis" in refused.stderr
    assert queue_depth(stack, typo) == -1
    assert snapshot(client) == before


def test_queue_selection_leaves_other_queues_unacked_entries(
    client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    short, long_, _ = queue_names
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names)
    for queue in (short, long_):
        for i in range(2):
            backlog.send(app, queue, f"{queue}:held-{i}")
        backlog.kill_consumer_holding(redis_url, queue, 2)
    backlog.backdate_unacked(client, 7200)
    theirs = {
        tag: value
        for tag, value in client.hgetall("unacked").items()
        if json.loads(value)[2] == long_
    }
    assert len(theirs) == 2

    done = run_migrate(client_env, "--from", redis_url, "--queue", short, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["unacked_migrated"] == 2 and report["quarantined"] == 0
    assert client.hgetall("unacked") == theirs  # byte-exact, where kombu keeps them
    assert client.llen("packit_broker.quarantine") == 0

    rest = run_migrate(client_env, "--from", redis_url, "--queue", long_, "--json")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert json.loads(rest.stdout.splitlines()[-1])["unacked_migrated"] == 2
    assert client.hlen("unacked") == 0


def test_wrong_typed_keys_are_named_and_skipped(
    stack: Stack, client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str
) -> None:
    short, long_, limited = queue_names
    client = redis.Redis.from_url(redis_url)
    app = backlog.producer(redis_url, queue_names)
    for i in range(3):
        backlog.send(app, short, f"{short}:plain-{i}")
    client.hset(long_, "not", "a list")
    client.set(f"{limited}\x06\x163", "a string")

    dry = run_migrate(client_env, "--from", redis_url, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    plan = json.loads(dry.stdout)
    assert {(w["key"], w["type"]) for w in plan["wrong_type"]} == {
        (long_, "hash"),
        (f"{limited}\x06\x163", "string"),
    }
    done = run_migrate(client_env, "--from", redis_url, "--json")
    assert done.returncode == 5, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["migrated"][short] == 3 and report["complete"] is False
    assert {w["key"] for w in report["wrong_type"]} == {long_, f"{limited}\x06\x163"}
    assert labels(stack, short) == ["plain-0", "plain-1", "plain-2"]
    assert client.hgetall(long_) == {b"not": b"a list"}
    assert client.get(f"{limited}\x06\x163") == b"a string"


def test_report_path_checked_first_and_duplicates_kept_until_written(
    client_env: dict[str, str], queue_names: tuple[str, str, str], redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    backlog.send(backlog.producer(redis_url, queue_names), queue_names[0], "x:one")
    # A crashed run's in-flight marker: those ids may exist twice.
    client.set("packit_broker.inflight", json.dumps({"source": "x", "ids": ["dup-1"], "at": 0}))
    before = snapshot(client)
    bad = run_migrate(client_env, "--from", redis_url, "--report", str(tmp_path / "no" / "r.json"))
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "--report" in bad.stderr
    assert snapshot(client) == before

    report_file = tmp_path / "r.json"
    done = run_migrate(client_env, "--from", redis_url, "--report", str(report_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(report_file.read_text())["possible_duplicates"] == ["dup-1"]
    assert not client.exists("packit_broker.possible_duplicates", "packit_broker.inflight")
    assert not list(tmp_path.glob(".packit-report-*"))
