"""Benchmark: Celery tasks/s through the router to 1 node vs 3 nodes (quorum queues), and the
throughput dip and recovery while the most-connected node of the three is SIGKILLed.

Run by hand (root: the rig makes network namespaces):
`.venv/bin/python -m bench.bench_cluster [--tasks 3000] [--rounds 3] [--balance source
--balance leastconn]`.
Everything in one run on one machine: the same two prefork workers (2 processes each, acks_late,
prefetch 1, configured by `celery_config()`), one producer publishing with confirms, the same
rendered template (REPLICAS=1 and 3, fresh clusters, in alternating order round after round).
Prints a table of medians with ratios.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from packit_broker.render import load_template, process
from packit_broker.stack.certs import Pki, make_pki
from tests.integration.test_cluster import (
    Producer,
    Worker,
    client_env,
    most_connected,
    producer_app,
    ran,
    wait_all_ran,
    workers,
)
from tests.rig.cluster import NamespaceCluster
from tests.rig.rendered import rendered_broker

ROUTE_HOST = "rabbitmq.apps.bench.test"


def done(pool: list[Worker]) -> int:
    return sum(ran(pool).values())


def throughput(cluster: NamespaceCluster, folder: Path, tasks: int) -> float:
    """Tasks/s from the first publish until the last task ran (producer and workers at once)."""
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    env = client_env(cluster, queue)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [f"t{i}" for i in range(tasks)]
    with workers(env, queue, folder) as pool:
        warm = Producer(producer_app(env), ["warm-up"])
        warm.run()
        wait_all_ran(pool, ["warm-up"], 60)
        began = time.monotonic()
        Producer(producer_app(env), labels).start()
        runs = wait_all_ran(pool, [*labels, "warm-up"], 600)
        elapsed = time.monotonic() - began
    missing = [label for label in labels if label not in runs]
    assert not missing, f"{len(missing)} tasks did not run"
    return tasks / elapsed


def node_loss(cluster: NamespaceCluster, folder: Path, tasks: int) -> tuple[float, float, float]:
    """(baseline tasks/s, lowest 1-s rate after the kill, seconds until >= 80% again)."""
    queue = f"bench-loss-{uuid.uuid4().hex[:6]}"
    env = client_env(cluster, queue)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [f"l{i}" for i in range(tasks)]
    with workers(env, queue, folder) as pool:
        Producer(producer_app(env), labels).start()
        while done(pool) < tasks // 5:
            time.sleep(0.2)
        start_count, start = done(pool), time.monotonic()
        time.sleep(5)
        baseline = (done(pool) - start_count) / (time.monotonic() - start)
        victim = most_connected(cluster)
        killed = time.monotonic()
        cluster.kill(victim)
        samples: list[tuple[float, int]] = [(killed, done(pool))]
        while done(pool) < tasks and time.monotonic() - killed < 120:
            time.sleep(1)
            samples.append((time.monotonic(), done(pool)))
        cluster.start_node(victim)
        wait_all_ran(pool, labels, 300)
    rates = [
        (t1 - killed, (n1 - n0) / (t1 - t0)) for (t0, n0), (t1, n1) in itertools.pairwise(samples)
    ]
    lowest = min(rate for _, rate in rates) if rates else 0.0
    back = next(
        (
            t
            for i, (t, _) in enumerate(rates)
            if i >= 2 and sum(r for _, r in rates[i - 2 : i + 1]) / 3 >= 0.8 * baseline
        ),
        float("inf"),
    )
    return baseline, lowest, back


#: A configuration measured: (replicas, the Route's ROUTE_BALANCE).
Config = tuple[int, str]


def one(root: Path, pki: Pki, config: Config, round_: int, tasks: int) -> dict[str, float]:
    """Start a fresh cluster of `replicas` nodes behind a Route with `balance`, measure, stop."""
    replicas, balance = config
    rendered = process(
        load_template("rabbitmq"),
        {"ROUTE_HOST": ROUTE_HOST, "REPLICAS": str(replicas), "ROUTE_BALANCE": balance},
    )
    tag = f"{replicas}{balance[0]}"
    cluster = NamespaceCluster(
        root / f"n{tag}-{round_}",
        rendered_broker(rendered),
        pki,
        server_hostname=ROUTE_HOST,
        replicas=replicas,
    )
    cluster.start()
    try:
        found = {"start": cluster.started_in}
        found["rate"] = throughput(cluster, root / f"w{tag}-{round_}", tasks)
        if replicas == 3:
            base, low, back = node_loss(cluster, root / f"loss{tag}-{round_}", tasks * 2)
            found.update(base=base, low=low, back=back)
        return found
    finally:
        cluster.stop()


def run(tasks: int, rounds: int, balances: tuple[str, ...]) -> None:
    """Rounds rotate the order of the configurations (1 node, then 3 nodes with each balance),
    each on fresh clusters, so a machine that gets busier or quieter weighs on all; medians
    are compared."""
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    pki = make_pki(root / "pki", (ROUTE_HOST,), "apps.bench.test")
    configs: list[Config] = [(1, balances[0]), *((3, balance) for balance in balances)]
    seen: dict[Config, list[dict[str, float]]] = {config: [] for config in configs}
    for round_ in range(rounds):
        shift = round_ % len(configs)
        for config in configs[shift:] + configs[:shift]:
            seen[config].append(one(root, pki, config, round_, tasks))
            print(f"round {round_ + 1}, {config}: {seen[config][-1]}", flush=True)

    def median(config: Config, key: str) -> float:
        return statistics.median(r[key] for r in seen[config])

    single = configs[0]
    rate1 = median(single, "rate")
    print(
        f"tasks per run: {tasks} (node loss: {tasks * 2}); 2 prefork workers x 2 processes;"
        f" medians of {rounds} rotating rounds"
    )
    rows = [
        ("cluster start, 1 node (s)", f"{median(single, 'start'):.1f}"),
        ("tasks/s, 1 node, quorum queue", f"{rate1:.0f}"),
    ]
    for config in configs[1:]:
        balance = config[1]
        rate3 = median(config, "rate")
        rows += [
            (f"[{balance}] cluster start, 3 nodes (s)", f"{median(config, 'start'):.1f}"),
            (f"[{balance}] tasks/s, 3 nodes, quorum queue (3 replicas)", f"{rate3:.0f}"),
            (f"[{balance}] ratio 3 nodes / 1 node", f"{rate3 / rate1:.2f}"),
            (f"[{balance}] tasks/s before the node loss", f"{median(config, 'base'):.0f}"),
            (f"[{balance}] lowest 1-s rate after SIGKILL", f"{median(config, 'low'):.0f}"),
            (
                f"[{balance}] dip: lowest / before",
                f"{median(config, 'low') / median(config, 'base'):.2f}",
            ),
            (f"[{balance}] seconds until >= 80% again (3-s mean)", f"{median(config, 'back'):.1f}"),
        ]
    print(f"{'measure':58} {'value':>10}")
    for name, value in rows:
        print(f"{name:58} {value:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--balance",
        action="append",
        choices=("source", "leastconn", "roundrobin"),
        help="the Route's ROUTE_BALANCE for the 3-node clusters; repeat to compare (default"
        " source)",
    )
    args = parser.parse_args()
    run(args.tasks, args.rounds, tuple(args.balance or ("source",)))


if __name__ == "__main__":
    main()
