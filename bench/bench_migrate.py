"""Benchmark `packit-broker migrate` against a reference mover and `celery migrate`.

Run by hand: `.venv/bin/python -m bench.bench_migrate [--messages 30000] [--million]`.
Everything runs on one machine, in one run, against the same local stack: `migrate` and the
reference go over TLS through the router stand-in; `celery migrate` cannot do TLS+SNI at all,
so it gets plain TCP to a TLS-originating HAProxy in front of the same broker (as the issue's
reference number was plain TCP). Prints a table with ratios against the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import amqp
import redis

from packit_broker import celery_config
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process, free_port, require, wait_until
from tests.integration import backlog

QUEUE = "bench"
WINDOW = 1000


def fill(stack: Stack, db: int, queue: str, count: int) -> None:
    url = stack.redis_url(db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    app = backlog.producer(url, [queue])
    backlog.send(app, queue, "template")
    template = client.lindex(queue, 0)
    assert template is not None
    for start in range(0, count - 1, 20000):
        n = min(20000, count - 1 - start)
        backlog.clone_many(client, queue, template, [f"m{start + i}" for i in range(n)])


def purge(stack: Stack, queue: str) -> None:
    config = celery_config(stack.broker_env())
    conn = amqp.Connection(
        f"127.0.0.1:{stack.router_port}",
        userid=stack.broker_account.username,
        password=stack.broker_account.password,
        ssl=config["broker_use_ssl"],
    )
    conn.connect()
    try:
        channel = conn.channel()
        with contextlib.suppress(amqp.exceptions.NotFound):
            channel.queue_delete(queue)
    finally:
        conn.close()


def reference_mover(stack: Stack, db: int, queue: str) -> None:
    """Batched reads + a window of unconfirmed publisher confirms on one connection."""
    client = redis.Redis.from_url(stack.redis_url(db))
    config = celery_config(stack.broker_env())
    conn = amqp.Connection(
        f"127.0.0.1:{stack.router_port}",
        userid=stack.broker_account.username,
        password=stack.broker_account.password,
        ssl=config["broker_use_ssl"],
    )
    conn.connect()
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False)
    channel.confirm_select()
    pending: set[int] = set()
    tag = 0

    def on_ack(t: int, multiple: bool) -> None:
        nonlocal pending
        pending = {p for p in pending if p > t} if multiple else pending - {t}

    channel.events["basic_ack"].add(on_ack)
    while True:
        batch = client.lrange(queue, -WINDOW, -1)
        if not batch:
            break
        for raw in reversed(batch):
            env = json.loads(raw)
            import base64

            channel.basic_publish(
                amqp.Message(
                    base64.b64decode(env["body"]),
                    application_headers=env["headers"],
                    delivery_mode=2,
                ),
                "",
                queue,
            )
            tag += 1
            pending.add(tag)
        while pending:
            conn.drain_events(timeout=10)
        client.ltrim(queue, 0, -(len(batch) + 1))
    conn.close()


def run_ours(stack: Stack, db: int) -> tuple[float, int]:
    """Seconds and peak RSS (KiB) of the real command, in its own process."""
    probe = (
        "import resource, sys\n"
        "from packit_broker.cli import cli\n"
        "try:\n    cli(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    env = {**os.environ, **stack.broker_env(), "PACKIT_BROKER_QUEUES": QUEUE}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", probe, "migrate", "--from", stack.redis_url(db), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    rss = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("RSS ")]
    if not rss:
        raise SystemExit(f"migrate failed: {done.stderr}")
    return seconds, rss[0]


def tls_originating_proxy(stack: Stack) -> tuple[Process, int]:
    """Plain TCP in, TLS (verified, SNI) out to RabbitMQ: what celery migrate can talk to."""
    port = free_port()
    folder = stack.root / "bench-proxy"
    folder.mkdir(exist_ok=True)
    cfg = folder / "haproxy.cfg"
    cfg.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        f"listen plain\n  bind 127.0.0.1:{port}\n"
        f"  server rabbit 127.0.0.1:{stack.amqps_port} ssl verify required"
        f" ca-file {stack.pki.ca_file} sni str({stack.rabbit_host})\n"
    )
    proc = Process(
        "bench-proxy", [require("haproxy", "haproxy"), "-db", "-f", str(cfg)], folder / "log"
    )
    proc.start()
    wait_until(lambda: True, proc, 5, "bench proxy")
    time.sleep(0.3)
    return proc, port


def run_celery_migrate(stack: Stack, db: int, port: int) -> float:
    account = stack.broker_account
    target = f"amqp://{account.username}:{account.password}@127.0.0.1:{port}//"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "celery", "migrate", stack.redis_url(db), target, "--queues", QUEUE],
        capture_output=True,
        check=False,
        env={**os.environ},
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--large", type=int, default=150000, help="second size for RSS")
    parser.add_argument("--million", action="store_true", help="also drain 1,000,000")
    args = parser.parse_args()
    n = args.messages
    rows: list[tuple[str, int, float, str]] = []
    with Stack() as stack:
        stack_start = time.perf_counter()
        fill(stack, 1, QUEUE, n)
        purge(stack, QUEUE)
        start = time.perf_counter()
        reference_mover(stack, 1, QUEUE)
        ref = n / (time.perf_counter() - start)
        rows.append(("reference mover (TLS via router)", n, ref, ""))

        fill(stack, 2, QUEUE, n)
        purge(stack, QUEUE)
        seconds, rss_small = run_ours(stack, 2)
        rows.append(
            (
                "packit-broker migrate (TLS via router)",
                n,
                n / seconds,
                f"peak RSS {rss_small // 1024} MiB",
            )
        )

        proxy, port = tls_originating_proxy(stack)
        try:
            fill(stack, 3, QUEUE, n)
            purge(stack, QUEUE)
            rows.append(
                (
                    "celery migrate (plain TCP)",
                    n,
                    n / run_celery_migrate(stack, 3, port),
                    "no confirms, no TLS",
                )
            )
        finally:
            proxy.stop()

        fill(stack, 4, QUEUE, args.large)
        purge(stack, QUEUE)
        seconds, rss_large = run_ours(stack, 4)
        rows.append(
            (
                "packit-broker migrate (TLS via router)",
                args.large,
                args.large / seconds,
                f"peak RSS {rss_large // 1024} MiB ({rss_large / rss_small:.2f}x of {n})",
            )
        )
        if args.million:
            fill(stack, 5, QUEUE, 1_000_000)
            purge(stack, QUEUE)
            seconds, rss = run_ours(stack, 5)
            rows.append(
                (
                    "packit-broker migrate (TLS via router)",
                    1_000_000,
                    1e6 / seconds,
                    f"peak RSS {rss // 1024} MiB",
                )
            )
        total = time.perf_counter() - stack_start
    print(f"\n{'mover':<42} {'messages':>9} {'msg/s':>9} {'x ref':>7}  notes")
    for name, count, rate, note in rows:
        print(f"{name:<42} {count:>9} {rate:>9.0f} {rate / ref:>7.2f}  {note}")
    ours = rows[1][2]
    print(
        f"\npackit-broker migrate vs celery migrate: {ours / rows[2][2]:.1f}x;"
        f" bench took {total:.0f}s; run id {uuid.uuid4().hex[:6]}"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
