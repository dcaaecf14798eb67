"""RabbitMQ's server certificate renewed under load: same CA, then a CA change with a bundle.

The Route is passthrough, so the certificate the workers verify is RabbitMQ's own (the TLS
Secret mounted into its pods). When the Secret is renewed, the kubelet swaps the mounted files
atomically; RabbitMQ serves the new certificate on new connections once its PEM cache is
cleared, and established connections keep the session they negotiated. Here: the users' gevent
workers, a producer calling `apply_async` through the router and the bridge carrying tasks still
published into Redis, while the certificate is renewed twice and every client is made to
reconnect (as a node restart or a router reload would). The procedure is the one
docs/deploy.md gives ("Renewing the certificate"): the clients trust a bundle of the old and
the new CA before the server changes CA. A worker that trusts only the old CA is the
counter-example: it cannot reconnect, says why, and its tasks wait in RabbitMQ until it trusts
the bundle.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu.pools
import pytest

from packit_broker.recovery import MAX_PUBLISH_BLOCK
from packit_broker.stack import Stack
from tests.integration.rabbitmqctl import rabbitmqctl
from tests.integration.test_check import first_failure
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
from tests.integration.test_router_reload import gevent_pool, redis_producer

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PAUSE = 0.05  # seconds between two apply_async
SETTLE = 6.0  # seconds of load after each rotation, before the next step
LOAD_SECONDS = 4 * SETTLE + 40  # both rotations, with room for the reconnects


def install_server_cert(stack: Stack, leaf: Any, staging: Path) -> None:
    """Replace RabbitMQ's certificate and key the way a Secret update does; clear its cache."""
    staging.mkdir(parents=True, exist_ok=True)
    cert, key = staging / "server.crt", staging / "server.key"
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    os.replace(key, stack.pki.server.key_file)
    os.replace(cert, stack.pki.server.cert_file)
    rabbitmqctl(stack, "eval", "ssl:clear_pem_cache().")


def reconnect_everyone(stack: Stack) -> float:
    """Close every client connection (as a node restart would); when (wall clock)."""
    at = time.time()
    rabbitmqctl(stack, "close_all_connections", "certificate rotation test")
    return at


def run_check(env: dict[str, str]) -> tuple[int, list[dict[str, str]], str]:
    """`packit-broker check --json` as the operator runs it: a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "packit_broker", "check", "--json", "--timeout", "3"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout), done.stdout + done.stderr


def seen_certificate(env: dict[str, str]) -> str:
    """What `packit-broker check` says of the certificate it verified."""
    _, results, output = run_check(env)
    lines = [r["seen"] for r in results if r["layer"] == "certificate"]
    assert lines, output
    return lines[0]


@pytest.fixture
def original_cert(stack: Stack, tmp_path: Path) -> Iterator[None]:
    """Put the stack's certificate back afterwards (the other tests trust the stack's CA).

    kombu keeps one process-wide pool of connections per broker, keyed by host, user, vhost,
    port and transport options but not by the `ssl` options (`Connection.__eqhash__`): a
    Celery app built here with the two-CA bundle would otherwise get the pooled connections of
    an earlier test's app, built with the old CA only, and fail once the server moves to the
    new CA. The pools are emptied before and after.
    """
    kombu.pools.reset()
    saved = tmp_path / "original"
    saved.mkdir()
    shutil.copy2(stack.pki.server.cert_file, saved / "server.crt")
    shutil.copy2(stack.pki.server.key_file, saved / "server.key")
    try:
        yield
    finally:
        os.replace(saved / "server.key", stack.pki.server.key_file)
        os.replace(saved / "server.crt", stack.pki.server.cert_file)
        rabbitmqctl(stack, "eval", "ssl:clear_pem_cache().")
        rabbitmqctl(stack, "close_all_connections", "certificate rotation test done")
        kombu.pools.reset()


def test_certificate_renewal_and_ca_change_lose_nothing(
    stack: Stack, original_cert: None, redis_url: str, tmp_path: Path
) -> None:
    import trustme

    authority = stack.pki.authority
    assert authority is not None, "the stack's PKI keeps its CA to renew certificates"
    hosts = (stack.rabbit_host, stack.postgres_host, "localhost", "127.0.0.1")
    now = datetime.datetime.now(datetime.UTC)
    renewed = authority.issue_cert(*hosts, not_after=now + datetime.timedelta(days=40))
    new_ca = trustme.CA(organization_name="packit-broker rotated CA")
    moved = new_ca.issue_cert(*hosts, not_after=now + datetime.timedelta(days=70))
    bundle = tmp_path / "ca-bundle.crt"  # old CA + new CA: what the clients get first
    bundle.write_bytes(stack.pki.ca_file.read_bytes() + new_ca.cert_pem.bytes())

    queue, stale_queue = f"rotate-{uuid.uuid4().hex[:6]}", f"stale-{uuid.uuid4().hex[:6]}"
    env = {
        **stack.broker_env(),
        "PACKIT_BROKER_CA_FILE": str(bundle),
        "PACKIT_BROKER_QUEUES": queue,
    }
    stale_env = {**stack.broker_env(), "PACKIT_BROKER_QUEUES": stale_queue}  # old CA only
    pool = gevent_pool(env, tmp_path, "rotate")
    (stale,) = gevent_pool(stale_env, tmp_path, "stale", count=1)
    fixed: Worker | None = None
    direct = [f"p{i}" for i in range(int(LOAD_SECONDS / PAUSE))]
    bridged = [f"b{i}" for i in range(int(LOAD_SECONDS / (2 * PAUSE)))]
    stale_labels = ["stale-before", "stale-after"]
    bridge = Bridge(env, redis_url, "--batch-size", "50")
    try:
        Producer(producer_app(env), ["warm-up"], task="usersapp.record").run()
        Producer(producer_app(stale_env), stale_labels[:1], task="usersapp.record").run()
        wait_ran_at_least(pool, 1, 60)
        wait_ran_at_least([stale], 1, 60)
        producer = Producer(producer_app(env), direct, task="usersapp.record", pause=PAUSE)
        producer.start()
        from_redis = redis_producer(redis_url, queue, bridged, pause=2 * PAUSE)
        time.sleep(SETTLE)

        # 1. Renewed by the same CA: nothing to do on the clients.
        install_server_cert(stack, renewed, tmp_path / "staging")
        same_ca = recovery_after(pool, reconnect_everyone(stack))
        renewed_seen = seen_certificate(env)
        time.sleep(SETTLE)

        # 2. The CA changes: the clients hold the bundle; the one that does not is cut off.
        install_server_cert(stack, moved, tmp_path / "staging")
        new_ca_cut = reconnect_everyone(stack)
        ca_change = recovery_after(pool, new_ca_cut)
        moved_seen = seen_certificate(env)
        stale_check = run_check(stale_env)
        stale_producer = producer_app(env | {"PACKIT_BROKER_QUEUES": stale_queue})
        Producer(stale_producer, stale_labels[1:], task="usersapp.record").run()
        assert not producer.done.is_set(), "the load ended before the CA change: raise LOAD_SECONDS"
        assert from_redis.is_alive(), "the Redis load ended before the CA change"
        time.sleep(SETTLE)
        stale_failing = (tmp_path / "stale0.log").read_text()
        stale_ran_while_cut = set(ran([stale]))
        assert producer.done.wait(120), "the producer did not finish"
        from_redis.join(60)
        runs = wait_all_ran(pool, ["warm-up", *direct, *bridged], 180)
        reconnects = bridge.metric("packit_migrate_reconnects_total")
        expiry = bridge.metric("packit_migrate_certificate_expiry_timestamp_seconds")
        assert all(w.process.running for w in pool), "a worker died"
        # The fix for the stale worker: the bundle, then a restart (a pod picks up the Secret).
        stale.process.stop()
        fixed_env = {**stale_env, "PACKIT_BROKER_CA_FILE": str(bundle)}
        (fixed,) = gevent_pool(fixed_env, tmp_path, "fixed", count=1)
        stale_runs = wait_all_ran([stale, fixed], stale_labels, 90)
    finally:
        bridge.proc.send_signal(signal.SIGTERM)
        code = bridge.wait(timeout=60)
        for worker in [*pool, stale, *([fixed] if fixed else [])]:
            worker.process.stop()
    lost = [label for label in [*direct, *bridged] if label not in runs]
    duplicates = sum(n - 1 for n in ran(pool).values() if n > 1)
    print(
        f"certificate rotation under load: {len(direct)} apply_async + {len(bridged)} via the"
        f" bridge, lost {len(lost)}, duplicates {duplicates}, workers consuming again"
        f" {[round(t, 1) for t in same_ca]} s after the same-CA renewal and"
        f" {[round(t, 1) for t in ca_change]} s after the CA change, longest apply_async"
        f" {producer.longest_call:.1f} s, bridge reconnects {reconnects:g}"
    )
    assert not lost, f"{len(lost)} tasks never ran, e.g. {lost[:5]}"
    assert code == 0, bridge.stderr
    assert max(same_ca) < RECOVERY_BUDGET, f"after the same-CA renewal: {same_ca} s"
    assert max(ca_change) < RECOVERY_BUDGET, f"after the CA change: {ca_change} s"
    assert producer.longest_call < MAX_PUBLISH_BLOCK
    assert reconnects >= 2, "the bridge was not made to reconnect"
    assert abs(expiry - _not_after(moved)) < 1, "the bridge's metric is not the new certificate's"
    # check reports the certificate it sees: issuer and days left
    assert "packit-broker stack CA" in renewed_seen and "expires in 40 days" in renewed_seen
    assert "rotated CA" in moved_seen and "expires in 70 days" in moved_seen
    # the client without the new CA: check and the worker both say why
    code_stale, results_stale, output_stale = stale_check
    assert code_stale != 0, output_stale
    failure = first_failure(results_stale)
    assert failure["layer"] == "certificate" and "CA_FILE" in failure["fix"], output_stale
    assert "certificate verify failed" in stale_failing, stale_failing[-2000:]
    assert "stale-after" not in stale_ran_while_cut, "a worker without the new CA got through"
    assert stale_runs.keys() >= set(stale_labels), "the stale worker's tasks were lost"


def _not_after(leaf: Any) -> float:
    """The leaf certificate's notAfter (epoch seconds)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return cert.not_valid_after_utc.timestamp()
