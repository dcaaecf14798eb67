"""The users' producer in a process of its own, configured like their API by `celery_config()`:
`python -m tests.integration.users_producer QUEUE COUNT LABEL COUNTDOWN` sends COUNT
`usersapp.record` tasks named LABEL0.. to QUEUE with `apply_async`, each with COUNTDOWN seconds
(0: none) and its due time as an argument, then prints how long the sending took."""

from __future__ import annotations

import sys
import time

from tests.integration.usersapp import record


def main() -> None:
    queue, count, label, countdown = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    started = time.monotonic()
    for index in range(count):
        due = time.time() + countdown
        options: dict[str, object] = {"queue": queue}
        if countdown:
            options["countdown"] = countdown
        record.apply_async((f"{label}{index}", due), **options)
    print(f"sent {count} in {time.monotonic() - started:.2f}s", flush=True)


if __name__ == "__main__":
    main()
