"""Prometheus metrics of a following migration (`migrate --follow --metrics-port`), forward
(the bridge) or back (a following rollback): the same names, "source" and "destination" being
Redis and RabbitMQ or the other way round.

What an SRE watches while producers switch over one by one: messages moved and quarantined,
what is still pending in Redis per queue, how long since the last move (a producer still on
Redis shows as moves continuing), whether the bridge is paused by a live Redis consumer, and
how long RabbitMQ takes to confirm a batch, and whether the bridge is connected to RabbitMQ
(0 while it reconnects after an outage).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from packit_broker.migrate.driver import Progress
from packit_broker.migrate.report import Report

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FollowMetrics:
    """One registry per process (never the global one: tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.moved = Counter(
            "packit_migrate_moved",
            "Messages confirmed by the destination and removed from the source",
            ["queue"],
            registry=self.registry,
        )
        self.quarantined = Gauge(
            "packit_migrate_quarantined",
            "Deprecated (one release): packit_migrate_quarantined_total",
            registry=self.registry,
        )
        self._report: Report | None = None
        self.registry.register(_QuarantineCollector(self))
        self.pending = Gauge(
            "packit_migrate_pending",
            "Messages still waiting in the source, per queue",
            ["queue"],
            registry=self.registry,
        )
        self.paused = Gauge(
            "packit_migrate_paused",
            "1 while a live consumer of the source pauses the bridge",
            registry=self.registry,
        )
        self.connected = Gauge(
            "packit_migrate_connected",
            "1 while connected to the destination, 0 while reconnecting after losing it",
            registry=self.registry,
        )
        self.reconnects = Counter(
            "packit_migrate_reconnects",
            "Connections to the destination lost mid-run and made again",
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "packit_migrate_batch_latency_seconds",
            "From sending a batch to its confirmation",
            ["queue"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.certificate_expiry = Gauge(
            "packit_migrate_certificate_expiry_timestamp_seconds",
            "When RabbitMQ's server certificate, as verified on the last connection, expires",
            registry=self.registry,
        )
        self._last_move = time.monotonic()
        self.last_move = Gauge(
            "packit_migrate_last_move_timestamp_seconds",
            "When a message was last moved (the run's start until one is)",
            registry=self.registry,
        )
        self.last_move.set(time.time())
        since = Gauge(
            "packit_migrate_seconds_since_last_move",
            "Deprecated (one release): time() - packit_migrate_last_move_timestamp_seconds",
            registry=self.registry,
        )
        since.set_function(lambda: time.monotonic() - self._last_move)

    def watch(self, report: Report) -> None:
        """Quarantine count straight from the report: one source of truth."""
        self._report = report
        self.quarantined.set_function(lambda: len(report.quarantine))

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve /metrics on `port` from a daemon thread."""
        start_http_server(port, addr=address, registry=self.registry)

    def counting(self, progress: Progress) -> Progress:
        """`progress`, with every move counted here too."""

        def both(queue: str, moved: int) -> None:
            progress(queue, moved)
            self.count(queue, moved)

        return both

    def set_paused(self, paused: bool) -> None:
        self.paused.set(1 if paused else 0)

    def set_pending(self, queue: str, count: int) -> None:
        self.pending.labels(queue).set(count)

    def observe_batch(self, queue: str, seconds: float) -> None:
        self.batch_latency.labels(queue).observe(seconds)

    def count(self, queue: str, moved: int) -> None:
        if moved:
            self.moved.labels(queue).inc(moved)
            self._last_move = time.monotonic()
            self.last_move.set(time.time())

    def set_certificate_expiry(self, expires_at: float | None) -> None:
        """What the last connection's verified certificate says (kept if it says nothing)."""
        if expires_at is not None:
            self.certificate_expiry.set(expires_at)

    def quarantined_count(self) -> int:
        return len(self._report.quarantine) if self._report is not None else 0


class _QuarantineCollector(Collector):
    """`packit_migrate_quarantined_total`: a counter read from the report (one source of
    truth), as the quarantine only ever grows during a run."""

    def __init__(self, metrics: FollowMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "packit_migrate_quarantined",
            "Entries set aside with a reason so far (see the report)",
            value=self.metrics.quarantined_count(),
        )
