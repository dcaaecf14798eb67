"""A real Celery producer on Redis in a process of its own (no GIL shared with the test):
`python -m tests.integration.celery_producer QUEUE RATE SECONDS OUT EVERY` sends
`taskapp.record` to QUEUE at RATE tasks/s for SECONDS, cycling through the priority buckets,
every EVERY-th task with a countdown (0: none), and writes one line per task sent to OUT:
queue, priority, label, task id, countdown (0/1). The Redis URL comes from
PRODUCER_REDIS_URL (a password stays out of argv)."""

from __future__ import annotations

import os
import sys
import time

from tests.integration import backlog

PRIORITIES = (0, 3, 6, 9)
COUNTDOWN = 2  # seconds


def main() -> None:
    queue, rate, seconds, out = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    every = int(sys.argv[5])
    app = backlog.producer(os.environ["PRODUCER_REDIS_URL"], [queue])
    sent = 0
    started = time.monotonic()
    with open(out, "w") as lines:
        while time.monotonic() - started < seconds:
            priority = PRIORITIES[sent % len(PRIORITIES)]
            delayed = every > 0 and sent % every == every - 1
            label = f"{queue}:{sent}"
            options: dict[str, object] = {"priority": priority}
            if delayed:
                options["countdown"] = COUNTDOWN
            task_id = backlog.send(app, queue, label, **options)
            lines.write(f"{queue}\t{priority}\t{label}\t{task_id}\t{int(delayed)}\n")
            sent += 1
            delay = started + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    app.close()


if __name__ == "__main__":
    main()
