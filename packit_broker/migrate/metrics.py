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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
            "Entries set aside with a reason so far (see the report)",
            registry=self.registry,
        )
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
        self._last_move = time.monotonic()
        since = Gauge(
            "packit_migrate_seconds_since_last_move",
            "Seconds since a message was last moved",
            registry=self.registry,
        )
        since.set_function(lambda: time.monotonic() - self._last_move)

    def watch(self, report: Report) -> None:
        """Quarantine count straight from the report: one source of truth."""
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
