"""Cluster tests: deselect (loudly) what this RabbitMQ cannot pass; print what was measured."""

from __future__ import annotations

import os

import pytest

from packit_broker.stack.rabbitmq import installed_version
from tests.rig.image import IMAGE_REPORT

#: RabbitMQ 3.10.0-3.10.8 may hang for good after a partition heals ("Global hang workaround:
#: global state ... seems broken"): rabbitmq-server#6034, fixed in 3.10.9. Debian 12 ships 3.10.8.
PARTITION_HEAL_FIXED_IN = (3, 10, 9)
NEEDS_PARTITION_HEAL_FIX = (
    "test_cluster.py::test_cut_off_node_pauses_and_nothing_confirmed_is_lost",
)

#: Filled by the cluster tests: one line per measurement, printed after the run.
CLUSTER_REPORT: list[str] = []
_DESELECTED: list[str] = []


installed_rabbitmq = installed_version


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    version = installed_rabbitmq()
    if version is None or version >= PARTITION_HEAL_FIXED_IN:
        return
    if os.environ.get("PACKIT_BROKER_TEST_OLD_PARTITION_HEAL") == "1":  # try it anyway
        return
    shown = ".".join(map(str, version))
    keep, drop = [], []
    for item in items:
        (drop if item.nodeid.endswith(NEEDS_PARTITION_HEAL_FIX) else keep).append(item)
    if not drop:
        return
    for item in drop:
        _DESELECTED.append(
            f"DESELECTED {item.nodeid}: RabbitMQ {shown} < 3.10.9 can hang for good after a"
            " network partition heals (rabbitmq-server#6034); run it on RabbitMQ >= 3.10.9"
            " (Debian 13's 4.0), as the CI's Debian 13 root does"
        )
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_report_collectionfinish(config: pytest.Config) -> list[str]:
    return list(_DESELECTED)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _DESELECTED:
        terminalreporter.section("deselected: RabbitMQ too old", sep="!", red=True, bold=True)
        for line in _DESELECTED:
            terminalreporter.line(line, red=True, bold=True)
    if IMAGE_REPORT:
        terminalreporter.section("image: measured")
        for line in IMAGE_REPORT:
            terminalreporter.line(line)
    if CLUSTER_REPORT:
        terminalreporter.section("three-host cluster: measured")
        for line in CLUSTER_REPORT:
            terminalreporter.line(line)
