"""Benchmark `packit-broker migrate` against a reference mover and `celery migrate`.

Run by hand: `.venv/bin/python -m bench.bench_migrate [--messages 30000] [--million]`.
Everything runs on one machine, in one run, against the same local stack: `migrate` and the
reference go over TLS through the router stand-in; `celery migrate` cannot do TLS+SNI at all,
so it gets plain TCP to a TLS-originating HAProxy in front of the same broker (as the issue's
reference number was plain TCP). Prints a table with ratios against the reference.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import amqp
import redis

from packit_broker.stack import Stack
from packit_broker.stack.processes import Process, free_port, require, wait_until
from tests.integration import backlog

QUEUE = "bench"
WINDOW = 1000
SETTLE_SECONDS = 3


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
    with stack.amqp_connection() as conn, contextlib.suppress(amqp.exceptions.NotFound):
        conn.channel().queue_delete(queue)


def reference_mover(stack: Stack, db: int, queue: str) -> None:
    """The plain mover migrate is measured against; see `_reference_loop`."""
    client = redis.Redis.from_url(stack.redis_url(db))
    with stack.amqp_connection() as conn:
        _reference_loop(client, conn, queue)


def _message(raw: bytes) -> amqp.Message:
    """The same AMQP message migrate publishes (what a worker needs), without its checks."""
    env = json.loads(raw)
    props = env["properties"]
    extra = {k: props[k] for k in ("correlation_id", "reply_to") if props.get(k) is not None}
    return amqp.Message(
        base64.b64decode(env["body"]),
        application_headers=env["headers"],
        content_type=env["content-type"],
        content_encoding=env["content-encoding"],
        delivery_mode=2,
        **extra,
    )


def _reference_loop(client: redis.Redis[bytes], conn: amqp.Connection, queue: str) -> None:
    """Plain and fair: read 1,000 from the tail with LRANGE, publish each (oldest first) with a
    sliding window of 1,000 unconfirmed publisher confirms, wait for the last confirm, LTRIM,
    repeat. Confirms are counted in O(1) per acked message (no rebuild of a pending set)."""
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False)
    channel.confirm_select()
    published = 0
    acked = 0  # every tag <= acked is confirmed
    singles: set[int] = set()  # confirmed out of order, above `acked`

    def on_ack(tag: int, multiple: bool) -> None:
        nonlocal acked
        if multiple:
            acked = max(acked, tag)
        else:
            singles.add(tag)
        while acked + 1 in singles:
            singles.discard(acked + 1)
            acked += 1

    channel.events["basic_ack"].add(on_ack)
    while True:
        batch = client.lrange(queue, -WINDOW, -1)
        if not batch:
            break
        for raw in reversed(batch):
            while published - acked >= WINDOW:
                conn.drain_events(timeout=10)
            channel.basic_publish(_message(raw), "", queue)
            published += 1
        while acked < published:
            conn.drain_events(timeout=10)
        client.ltrim(queue, 0, -(len(batch) + 1))


def run_ours(stack: Stack, db: int) -> tuple[float, float, int]:
    """(wall seconds, seconds the run reports, peak RSS KiB) of the real command."""
    probe = (
        "import resource, sys\n"
        "from packit_broker.cli import cli\n"
        "try:\n    cli(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
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
    wall = time.perf_counter() - start
    rss = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("RSS ")]
    final = json.loads(done.stdout.splitlines()[-1]) if done.stdout else {}
    if not rss or final.get("event") != "done":
        raise SystemExit(f"migrate failed: {done.stderr}")
    return wall, float(final["seconds"]), rss[0]


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


def run_celery_migrate(stack: Stack, db: int, port: int, count: int) -> float:
    """Seconds until `celery migrate -a` has moved `count` messages (it then idles `-t 1`)."""
    account = stack.broker_account
    target = f"amqp://{account.username}:{account.password}@127.0.0.1:{port}//"
    start = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "migrate",
            stack.redis_url(db),
            target,
            "-Q",
            QUEUE,
            "--ack-messages",
            "--timeout",
            "1",
            "--limit",
            str(count),
        ],
        capture_output=True,
        check=False,
        env={**os.environ},
        timeout=900,
    )
    if done.returncode != 0:
        raise SystemExit(f"celery migrate failed: {done.stderr[-2000:]!r}")
    return time.perf_counter() - start


def settle(stack: Stack, queue: str) -> None:
    """Delete what a run left in RabbitMQ and let the broker finish that work off the clock."""
    purge(stack, queue)
    time.sleep(SETTLE_SECONDS)


def compare(stack: Stack, size: int, repeat: int) -> tuple[float, tuple[float, float, int]]:
    """Alternate reference and ours `repeat` times at `size`; medians of each.

    The machine's speed drifts between runs (another tenant, RabbitMQ's background work);
    alternating and taking medians cancels most of it. Each run starts on an empty broker.
    """
    ref_runs, our_runs = [], []
    for _ in range(repeat):
        fill(stack, 1, QUEUE, size)
        start = time.perf_counter()
        reference_mover(stack, 1, QUEUE)
        ref_runs.append(time.perf_counter() - start)
        settle(stack, QUEUE)
        fill(stack, 2, QUEUE, size)
        our_runs.append(run_ours(stack, 2))
        settle(stack, QUEUE)
        _, moving, rss = our_runs[-1]
        print(
            f"round at {size}: reference {size / ref_runs[-1]:.0f} msg/s,"
            f" migrate {size / moving:.0f} msg/s (peak RSS {rss // 1024} MiB)",
            file=sys.stderr,
            flush=True,
        )
    ours = sorted(our_runs, key=lambda run: run[1])[len(our_runs) // 2]
    return statistics.median(ref_runs), ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--large", type=int, default=150000, help="second size for RSS")
    parser.add_argument("--million", action="store_true", help="also drain 1,000,000")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per size")
    args = parser.parse_args()
    rows: list[tuple[str, int, float, float, str]] = []  # name, n, wall s, moving s, note
    ratios: list[str] = []
    began = time.perf_counter()
    rss_small = 0
    with Stack() as stack:
        settle(stack, QUEUE)
        sizes = [args.messages, args.large] + ([1_000_000] if args.million else [])
        for size in sizes:
            repeat = args.repeat if size < 1_000_000 else 1
            ref_seconds, (wall, moving, rss) = compare(stack, size, repeat)
            rss_small = rss_small or rss
            note = f"median of {repeat}" if repeat > 1 else "one run"
            rows.append(("reference mover (TLS via router)", size, ref_seconds, ref_seconds, note))
            rows.append(
                (
                    "packit-broker migrate (TLS via router)",
                    size,
                    wall,
                    moving,
                    f"{note}; peak RSS {rss // 1024} MiB ({rss / rss_small:.2f}x)",
                )
            )
            ratios.append(f"at {size}: {ref_seconds / moving:.2f}x the same-size reference")
            if size == args.messages:
                proxy, port = tls_originating_proxy(stack)
                try:
                    fill(stack, 3, QUEUE, size)
                    wall = run_celery_migrate(stack, 3, port, size)
                    rows.append(
                        (
                            "celery migrate -a (plain TCP)",
                            size,
                            wall,
                            wall,
                            "one run; no confirms, no TLS",
                        )
                    )
                finally:
                    proxy.stop()
                    settle(stack, QUEUE)
    ref_rate = rows[0][1] / rows[0][3]
    print(f"\n{'mover':<40} {'messages':>9} {'wall s':>7} {'msg/s':>7} {'x ref':>6}  notes")
    for name, count, wall, moving, note in rows:
        rate = count / moving
        print(f"{name:<40} {count:>9} {wall:>7.1f} {rate:>7.0f} {rate / ref_rate:>6.2f}  {note}")
    ours, celery = rows[1][1] / rows[1][3], rows[2][1] / rows[2][3]
    print("\npackit-broker migrate " + "; ".join(ratios))
    print(
        f"x ref is against the {args.messages}-message reference; msg/s of packit-broker"
        f" excludes its ~1 s process start (wall s includes it); vs celery migrate:"
        f" {ours / celery:.1f}x (wall: {rows[2][2] / rows[1][2]:.1f}x);"
        f" bench took {time.perf_counter() - began:.0f}s"
    )


if __name__ == "__main__":
    main()
