"""`check`'s cluster finding from the server properties (pure logic; the live side is in
tests/integration/test_cluster.py and test_templates_live.py)."""

from __future__ import annotations

from typing import Any

import pytest

from packit_broker.doctor.amqp_checks import _cluster
from packit_broker.doctor.results import _Report
from packit_broker.queues import REPLICAS_SERVER_PROPERTY, QueueSettings, QueueType


def finding(properties: dict[str, Any], queue_type: QueueType) -> list[tuple[str, str]]:
    report = _Report("broker", "amqps://rabbitmq.example:443/")
    _cluster(report, properties, QueueSettings(queue_type=queue_type))
    return [(r.status, r.seen + " | " + r.fix) for r in report.results]


@pytest.mark.parametrize("raw", [b"3", "3", 3])
def test_classic_queues_on_a_cluster_warn_with_the_fix(raw: Any) -> None:
    ((status, text),) = finding({REPLICAS_SERVER_PROPERTY: raw}, QueueType.CLASSIC)
    assert status == "warn"
    assert "REPLICAS=3" in text and "PACKIT_BROKER_QUEUE_TYPE=quorum" in text


def test_quorum_queues_on_a_cluster_pass() -> None:
    ((status, text),) = finding({REPLICAS_SERVER_PROPERTY: b"5"}, QueueType.QUORUM)
    assert status == "ok" and "REPLICAS=5" in text


@pytest.mark.parametrize("queue_type", list(QueueType))
def test_one_node_is_information_only(queue_type: QueueType) -> None:
    ((status, _),) = finding({REPLICAS_SERVER_PROPERTY: b"1"}, queue_type)
    assert status == "info"


@pytest.mark.parametrize("properties", [{}, {REPLICAS_SERVER_PROPERTY: b"three"}])
def test_a_broker_that_does_not_say_is_not_guessed_about(properties: dict[str, Any]) -> None:
    """Not the bundled template (or a value that is no number): nothing is claimed."""
    assert finding(properties, QueueType.CLASSIC) == []
