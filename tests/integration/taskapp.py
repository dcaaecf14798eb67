"""A Celery app configured only by `celery_config()`, as a celerizer would do it."""

from __future__ import annotations

import os
import time

from celery import Celery

from packit_broker import celery_config

app = Celery("taskapp")
app.conf.update(celery_config())
app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True)

LOG = os.environ.get("TASKAPP_LOG")


@app.task(name="taskapp.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="taskapp.record", bind=True)
def record(self, label: str) -> str:  # type: ignore[no-untyped-def]
    """Append `label` and where it came from to TASKAPP_LOG: the order tasks actually ran in."""
    if LOG:
        with open(LOG, "a") as out:
            out.write(
                f"{label}\t{self.request.id}\t{self.request.delivery_info.get('routing_key')}"
                f"\t{time.time()}\n"
            )
    return label
