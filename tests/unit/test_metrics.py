"""The bridge's Prometheus metrics, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import time
import urllib.request

from packit_broker.migrate.metrics import FollowMetrics
from packit_broker.migrate.report import QuarantinedEntry, Report
from packit_broker.stack.processes import free_port


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in lines if line.startswith("packit_"))
    }


def test_metrics_follow_the_report_and_the_moves() -> None:
    report = Report()
    metrics = FollowMetrics()
    metrics.watch(report)
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    metrics.count("q", 3)
    metrics.count("q", 2)
    metrics.pending.labels("q").set(7)
    metrics.batch_latency.labels("q").observe(0.2)
    report.quarantine.append(QuarantinedEntry("q", "not JSON"))
    seen = scrape(port)
    assert seen['packit_migrate_moved_total{queue="q"}'] == 5
    assert seen['packit_migrate_pending{queue="q"}'] == 7
    assert seen["packit_migrate_quarantined_total"] == 1
    assert seen["packit_migrate_quarantined"] == 1  # the deprecated gauge, for one release
    assert seen['packit_migrate_batch_latency_seconds_count{queue="q"}'] == 1
    assert 0 <= time.time() - seen["packit_migrate_last_move_timestamp_seconds"] < 5
    assert 0 <= seen["packit_migrate_seconds_since_last_move"] < 5
    assert seen["packit_migrate_paused"] == 0
    report.quarantine.append(QuarantinedEntry("q", "not JSON either"))
    assert scrape(port)["packit_migrate_quarantined_total"] == 2


def test_the_last_move_is_a_timestamp_that_stays_put_between_moves() -> None:
    """Prometheus convention: a timestamp, so that `time() - x` ages it without a scrape."""
    metrics = FollowMetrics()
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    started = scrape(port)["packit_migrate_last_move_timestamp_seconds"]
    time.sleep(1.1)
    assert scrape(port)["packit_migrate_last_move_timestamp_seconds"] == started
    metrics.count("q", 1)
    assert scrape(port)["packit_migrate_last_move_timestamp_seconds"] > started + 1


def test_no_certificate_seen_keeps_the_last_expiry() -> None:
    metrics = FollowMetrics()
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    metrics.set_certificate_expiry(2_000_000_000.0)
    metrics.set_certificate_expiry(None)
    assert scrape(port)["packit_migrate_certificate_expiry_timestamp_seconds"] == 2e9


def test_connected_goes_to_0_while_reconnecting() -> None:
    metrics = FollowMetrics()
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    metrics.connected.set(1)
    assert scrape(port)["packit_migrate_connected"] == 1
    metrics.connected.set(0)
    metrics.reconnects.inc()
    seen = scrape(port)
    assert seen["packit_migrate_connected"] == 0 and seen["packit_migrate_reconnects_total"] == 1
