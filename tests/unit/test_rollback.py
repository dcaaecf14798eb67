"""The rollback's pure parts: direction by scheme, usage errors before any connection, the
sink's grouping of a batch, the plan's refusals, deliveries and how held ones are reported."""

from __future__ import annotations

import base64
import socket
from datetime import datetime

import amqp
import pytest
from click.testing import CliRunner

from packit_broker.commands.migrate import _scheme, migrate
from packit_broker.migrate.amqp_source import Delivery, HeldMessage
from packit_broker.migrate.redis_sink import RedisEntry, _runs
from packit_broker.migrate.rollback import RollbackPlan, RollbackQueue
from packit_broker.queues import QueueSpec

AMQP_URL = "amqps://user:s3cret-pw@rabbit.example.com:443/"
REDIS_URL = "redis://:r3dis-pw@127.0.0.1:1/0"


def test_scheme_never_needs_the_rest_of_the_url() -> None:
    assert _scheme(AMQP_URL) == "amqps"
    assert _scheme(" REDIS://x") == "redis"
    assert _scheme("no-scheme-here") == ""


@pytest.mark.parametrize(
    ("env", "args", "says"),
    [
        ({"PACKIT_MIGRATE_FROM": AMQP_URL}, [], "PACKIT_MIGRATE_TO"),
        ({"PACKIT_MIGRATE_FROM": AMQP_URL, "PACKIT_MIGRATE_TO": AMQP_URL}, [], "redis://"),
        (
            {"PACKIT_MIGRATE_FROM": AMQP_URL, "PACKIT_MIGRATE_TO": REDIS_URL},
            ["--metrics-port", "9999"],
            "need --follow",
        ),
        ({"PACKIT_MIGRATE_FROM": REDIS_URL, "PACKIT_MIGRATE_TO": REDIS_URL}, [], "rollback goes"),
        (
            {"PACKIT_MIGRATE_FROM": AMQP_URL, "PACKIT_MIGRATE_TO": "redis://:r3dis-pw@h:1/x"},
            [],
            "PACKIT_MIGRATE_TO",
        ),
    ],
    ids=["no-to", "to-not-redis", "metrics-port-without-follow", "redis-to-redis", "bad-redis-url"],
)
def test_direction_usage_errors_exit_2_without_secrets(
    env: dict[str, str], args: list[str], says: str
) -> None:
    """Refused before anything is dialled (the hosts do not even exist)."""
    result = CliRunner().invoke(migrate, args, env={"PACKIT_BROKER_URL": "", **env})
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "s3cret-pw" not in result.output and "r3dis-pw" not in result.output


def test_metrics_port_in_use_is_a_usage_error_before_anything_is_dialled() -> None:
    """Not a "[redis] connection" failure (an OSError the run's handler would misname)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PACKIT_BROKER_URL": "", "PACKIT_MIGRATE_FROM": AMQP_URL}
        result = CliRunner().invoke(
            migrate,
            ["--follow", "--metrics-port", str(port)],
            env={**env, "PACKIT_MIGRATE_TO": REDIS_URL},
        )
    assert result.exit_code == 2, result.output
    assert f"--metrics-port {port}" in result.output and "[redis]" not in result.output
    assert "s3cret-pw" not in result.output and "r3dis-pw" not in result.output


def test_runs_group_consecutive_entries_of_one_list_in_order() -> None:
    entries = [RedisEntry(k, p) for k, p in [("a", b"1"), ("a", b"2"), ("b", b"3"), ("a", b"4")]]
    assert _runs(entries) == [("a", [b"1", b"2"]), ("b", [b"3"]), ("a", [b"4"])]
    assert _runs([]) == []


def test_plan_refuses_consumed_queues_and_missing_requested_ones() -> None:
    busy = RollbackQueue(QueueSpec("short-running"), "configured", ready=3, consumers=2)
    idle = RollbackQueue(QueueSpec("long-running"), "configured", ready=0, consumers=0)
    assert RollbackPlan([idle]).refusal is None
    refusal = RollbackPlan([busy, idle]).refusal
    assert refusal is not None and "'short-running' has 2 consumer(s)" in refusal
    assert "long-running" not in refusal
    missing = RollbackPlan([], missing=["nope"]).selection_refusal
    assert missing is not None and "'nope'" in missing
    plan = RollbackPlan([idle], skipped={"rate-limited": "configured, but no such queue"})
    assert plan.as_dict()["skipped"] == [
        {"name": "rate-limited", "reason": "configured, but no such queue"}
    ]


def _delivery(body: bytes | str, **properties: object) -> Delivery:
    message = amqp.Message(body, **properties)
    message.delivery_info = {
        "delivery_tag": 7,
        "exchange": "",
        "routing_key": "q",
        "redelivered": True,
    }
    return Delivery.of(message)


def test_delivery_keeps_the_exact_body_and_what_came_with_it() -> None:
    delivery = _delivery(b"\x00\xff", application_headers={"id": "1"}, priority=4)
    assert bytes(delivery) == b"\x00\xff"
    assert (delivery.tag, delivery.routing_key, delivery.redelivered) == (7, "q", True)
    assert delivery.properties["priority"] == 4
    assert bytes(_delivery("")) == b""  # py-amqp's default body of a bodyless message
    with pytest.raises(TypeError, match="auto_decode"):
        _delivery("decoded text")


def test_held_message_is_reported_whole_and_as_json() -> None:
    stamp = datetime(2026, 1, 2, 3, 4, 5)
    delivery = _delivery(
        b"\x80raw", application_headers={"id": "t-1", "at": stamp, "b": b"\x01"}, priority=1
    )
    shown = HeldMessage("q", delivery).as_dict()
    assert base64.b64decode(shown["body_base64"]) == b"\x80raw"
    assert shown["task_id"] == "t-1"
    assert shown["properties"]["application_headers"] == {
        "id": "t-1",
        "at": str(stamp),
        "b": {"base64": "AQ=="},
    }
    assert "delivery 7, 4 bytes, body sha1" in shown["delivery"]


def test_durability_levels_and_warnings() -> None:
    from packit_broker.migrate.redis_sink import Durability

    assert Durability("yes", "always").level == "fsync-always"
    assert Durability("yes", "always").warning is None
    assert Durability("yes", "everysec").level == "aof-everysec"
    assert Durability("no", "everysec").level == "memory"
    assert "memory only" in (Durability("no", "always").warning or "")
    assert Durability("unknown", "unknown").level == "unknown"
    assert "CONFIG GET denied" in (Durability("unknown", "unknown").warning or "")


def test_an_evicting_redis_is_named() -> None:
    from packit_broker.migrate.redis_sink import Durability

    safe = Durability("yes", "always", "noeviction")
    assert safe.warning is None and not Durability("yes", "always", "volatile-lru").evicts
    evicting = Durability("yes", "always", "allkeys-lru")
    assert "maxmemory-policy noeviction" in (evicting.warning or "")
    both = Durability("no", "everysec", "allkeys-lfu").warning or ""
    assert "memory only" in both and "allkeys-lfu" in both
    assert "tens of seconds" in (Durability("yes", "no").warning or "")
