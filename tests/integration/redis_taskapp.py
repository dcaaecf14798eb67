"""A Celery app still on Redis (the deployment before the cut-over), configured by env:
REDIS_TASKAPP_URL, REDIS_TASKAPP_QUEUES (comma-separated) and REDIS_TASKAPP_OPTIONS (JSON
broker_transport_options); REDIS_TASKAPP_LOG, if set, gets a line per task run (label, id,
routing key), in the order they ran."""

from __future__ import annotations

import json
import os
import time

from celery import Celery
from kombu import Exchange, Queue

app = Celery("redis_taskapp", broker=os.environ["REDIS_TASKAPP_URL"])
app.conf.update(
    task_queues=[
        Queue(q, Exchange(q), routing_key=q)
        for q in os.environ.get("REDIS_TASKAPP_QUEUES", "celery").split(",")
    ],
    broker_transport_options=json.loads(os.environ.get("REDIS_TASKAPP_OPTIONS", "{}")),
    worker_prefetch_multiplier=1,
    task_acks_late=True,
)


@app.task(name="taskapp.record", bind=True)
def record(self, label: str) -> str:  # type: ignore[no-untyped-def]
    """Stands for a long task: holds its message unacked while it runs."""
    time.sleep(float(os.environ.get("REDIS_TASKAPP_SLEEP", "0")))
    if log := os.environ.get("REDIS_TASKAPP_LOG"):
        with open(log, "a") as out:
            routing_key = self.request.delivery_info.get("routing_key")
            out.write(f"{label}\t{self.request.id}\t{routing_key}\n")
    return label
