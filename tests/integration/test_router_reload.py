"""Router reloads under load, the way the OpenShift router does them.

Every Route change in the cluster reloads the router: a new HAProxy takes over the listeners
and the old one keeps its sessions; clusters set `ROUTER_HARD_STOP_AFTER` so that old processes
held alive by long-lived tunnels (every AMQP connection) do not pile up, which cuts every client
at each reload (openshift/router#429, #630). Here: the users' gevent workers (16 greenlets,
prefetch 1, `acks_late`), a producer calling `apply_async` through the Route, and the bridge
carrying tasks still published into Redis, while the router is reloaded three times with a short
hard-stop-after. Every task runs, each worker consumes again within RECOVERY_BUDGET of each
cut, no `apply_async` blocks longer than MAX_PUBLISH_BLOCK, the bridge reconnects each time and
loses nothing.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from packit_broker.recovery import MAX_PUBLISH_BLOCK
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process, free_port
from packit_broker.stack.router_process import reload_router, start_router
from tests.integration import backlog
from tests.integration.test_cluster import (
    RECOVERY_BUDGET,
    Producer,
    Worker,
    producer_app,
    ran,
    recovery_after,
    wait_all_ran,
    wait_ran_at_least,
)
from tests.integration.test_migrate_follow_faults import Bridge
from tests.integration.workers import start_users_worker

pytestmark = [pytest.mark.integration, pytest.mark.fault]

HARD_STOP_AFTER = 3.0  # seconds; clusters use minutes to an hour, the cut is the same
RELOADS = 3
RELOAD_EVERY = 10.0  # seconds between reloads: each cut recovered from before the next
PAUSE = 0.05  # seconds between two apply_async: a steady load, not a burst
#: Long enough that both producers still publish at the last cut (checked at each cut).
LOAD_SECONDS = RELOADS * (RELOAD_EVERY + HARD_STOP_AFTER) + 20


class ReloadingRouter:
    """The router stand-in with `hard-stop-after`, reloadable; old processes reaped."""

    def __init__(self, stack: Stack) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="reload-"))  # short: unix socket paths
        self.port = free_port()
        self.process = start_router(
            self.folder,
            self.port,
            stack.pki.router_default_pem,
            stack.routes(),
            hard_stop_after=f"{HARD_STOP_AFTER:g}s",
        )
        self.retired: list[Process] = []

    def reload(self) -> float:
        """Reload; when the old process's sessions are cut (wall clock)."""
        reloaded_at = time.time()
        old, self.process = self.process, reload_router(self.process)
        self.retired.append(old)
        return reloaded_at + HARD_STOP_AFTER

    def stop(self) -> None:
        for process in [*self.retired, self.process]:
            process.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def router(stack: Stack) -> Iterator[ReloadingRouter]:
    started = ReloadingRouter(stack)
    try:
        yield started
    finally:
        started.stop()


def gevent_pool(env: dict[str, str], folder: Path, name: str, count: int = 2) -> list[Worker]:
    """`count` of the users' gevent workers (16 greenlets, prefetch 1), each logging its runs."""
    return [
        Worker(
            start_users_worker(
                {**env, "TASKAPP_LOG": str(folder / f"{name}{n}.tasks")},
                "gevent",
                [env["PACKIT_BROKER_QUEUES"]],
                folder / f"{name}{n}.log",
                f"{name}{n}",
            ),
            folder / f"{name}{n}.tasks",
        )
        for n in range(count)
    ]


def redis_producer(redis_url: str, queue: str, labels: list[str], pause: float) -> threading.Thread:
    """A producer still on Redis (not switched yet): what the bridge carries over."""
    app = backlog.producer(redis_url, (queue,))

    def run() -> None:
        for label in labels:
            app.send_task("usersapp.record", (label,), queue=queue)
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_router_reloads_under_load_lose_nothing_and_workers_come_back(
    stack: Stack, router: ReloadingRouter, redis_url: str, tmp_path: Path
) -> None:
    queue = f"reload-{uuid.uuid4().hex[:6]}"
    env = {
        **stack.broker_env(),
        "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{router.port}",
        "PACKIT_BROKER_QUEUES": queue,
    }
    direct = [f"p{i}" for i in range(int(LOAD_SECONDS / PAUSE))]
    bridged = [f"b{i}" for i in range(int(LOAD_SECONDS / (2 * PAUSE)))]
    pool = gevent_pool(env, tmp_path, "reload")
    bridge = Bridge(env, redis_url, "--batch-size", "50")
    try:
        producer = Producer(producer_app(env), ["warm-up"], task="usersapp.record")
        producer.run()
        wait_ran_at_least(pool, 1, 60)
        producer = Producer(producer_app(env), direct, task="usersapp.record", pause=PAUSE)
        producer.start()
        from_redis = redis_producer(redis_url, queue, bridged, pause=2 * PAUSE)
        cuts, recoveries = [], []
        for _ in range(RELOADS):
            time.sleep(RELOAD_EVERY / 2)
            cut = router.reload()
            cuts.append(cut)
            time.sleep(max(0.0, cut - time.time()))
            assert not producer.done.is_set(), "the load ended before the cut: raise LOAD_SECONDS"
            assert from_redis.is_alive(), "the Redis load ended before the cut: raise LOAD_SECONDS"
            recoveries.append(recovery_after(pool, cut))
            time.sleep(RELOAD_EVERY / 2)
        assert producer.done.wait(120), "the producer did not finish"
        from_redis.join(60)
        runs = wait_all_ran(pool, ["warm-up", *direct, *bridged], 180)
        reconnects = bridge.metric("packit_migrate_reconnects_total")
        assert all(w.process.running for w in pool), "a worker died"
    finally:
        bridge.proc.send_signal(signal.SIGTERM)
        code = bridge.wait(timeout=60)
        for worker in pool:
            worker.process.stop()
    lost = [label for label in [*direct, *bridged] if label not in runs]
    duplicates = sum(n - 1 for n in ran(pool).values() if n > 1)
    worst = max(max(r) for r in recoveries)
    print(
        f"router reloads ({RELOADS}, hard-stop-after {HARD_STOP_AFTER:g} s) under load:"
        f" {len(direct)} apply_async + {len(bridged)} via the bridge, lost {len(lost)},"
        f" duplicates {duplicates}, worker recovery after each cut"
        f" {[round(max(r), 1) for r in recoveries]} s, longest apply_async"
        f" {producer.longest_call:.1f} s, publish errors {len(producer.errors)},"
        f" bridge reconnects {reconnects:g}"
    )
    assert not lost, f"{len(lost)} tasks never ran, e.g. {lost[:5]}"
    assert code == 0, bridge.stderr
    assert reconnects >= RELOADS, "the bridge was not cut at each reload: no hard stop?"
    assert worst < RECOVERY_BUDGET, f"workers consumed again after {recoveries} s"
    assert producer.longest_call < MAX_PUBLISH_BLOCK
