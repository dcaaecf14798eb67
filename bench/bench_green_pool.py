"""Benchmark: the users' gevent worker against their threads worker, same app, same broker.

Run by hand: `.venv/bin/python -m bench.bench_green_pool [--tasks 1000] [--rate 200] [--rounds 3]`.
One RabbitMQ (TLS) behind the router stand-in; each round starts a fresh worker of each pool in
alternating order with the users' own command line (gevent: `--concurrency=16`, threads:
`--concurrency=4`, both `--prefetch-multiplier=1`, configured by `celery_config()`, task events
on) and sends it `--tasks` trivial tasks at `--rate` a second; it prints the medians of the tasks
per second each worker ran and of their wait from `apply_async` to start, and the ratios
gevent / threads. The threads pool does not go through Celery's green-pool loop: the plain
reference for what the gevent worker costs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import uuid
from pathlib import Path

from packit_broker.stack import Stack
from tests.integration.workers import steady_load

POOLS = ("gevent", "threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-green-"))
    rates: dict[str, list[float]] = {pool: [] for pool in POOLS}
    waits: dict[str, list[float]] = {pool: [] for pool in POOLS}
    with Stack() as stack:
        for round_ in range(args.rounds):
            for pool in POOLS if round_ % 2 == 0 else tuple(reversed(POOLS)):
                folder = root / f"{pool}-{round_}"
                folder.mkdir()
                queue = f"bench-green-{uuid.uuid4().hex[:6]}"
                env = {**stack.broker_env(), "PACKIT_BROKER_QUEUES": queue}
                latencies, rate = steady_load(env, pool, folder, args.rate, args.tasks)
                rates[pool].append(rate)
                waits[pool].append(statistics.median(latencies))
                print(f"round {round_ + 1}, {pool}: {rate:.0f} tasks/s,"
                      f" median wait {waits[pool][-1] * 1000:.0f} ms", flush=True)  # fmt: skip
    rate = {pool: statistics.median(rates[pool]) for pool in POOLS}
    wait = {pool: statistics.median(waits[pool]) for pool in POOLS}
    print(f"{args.tasks} tasks sent at {args.rate:g}/s per run; medians of {args.rounds} rounds")
    print(f"{'measure':44} {'gevent':>9} {'threads':>9} {'ratio':>7}")
    print(f"{'tasks/s':44} {rate['gevent']:9.0f} {rate['threads']:9.0f}"
          f" {rate['gevent'] / rate['threads']:7.2f}")  # fmt: skip
    print(f"{'median wait apply_async -> start (ms)':44} {wait['gevent'] * 1000:9.0f}"
          f" {wait['threads'] * 1000:9.0f} {wait['gevent'] / wait['threads']:7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
