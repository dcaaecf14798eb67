"""The users' Celery app as packit-service builds it, configured by `celery_config()`.

Their settings (research.md, "How the users really run workers"): results ignored by default,
task events on (Flower), a 900 s time limit, `acks_late` tasks; their worker command lines are
in `tests/integration/workers.py` (`users_worker`).
"""

from __future__ import annotations

import os
import time

from celery import Celery

from packit_broker import celery_config

if os.environ.get("USERSAPP_KOMBU_4X_QOS"):
    # What kombu (>= 5.7) reports for RabbitMQ 4.x, forced on any version: per-consumer
    # prefetch semantics (celery/kombu#2481). Lets RabbitMQ 3.10 show the classic-queue
    # countdown case packit_broker.celery_worker.ChannelPrefetch exists for.
    from kombu.transport import pyamqp

    pyamqp.Transport.qos_semantics_matches_spec = lambda self, connection: True

# Theirs is `Celery(broker=redis db 0, backend=redis db 1)`; a test sets the backend this way.
app = Celery("usersapp", backend=os.environ.get("USERSAPP_RESULT_BACKEND") or None)
app.conf.update(celery_config())
app.conf.update(
    task_ignore_result=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_time_limit=900,
)

LOG = os.environ.get("TASKAPP_LOG")


@app.task(name="usersapp.record", bind=True, acks_late=True)
def record(self, label: str, due: float | None = None) -> str:  # type: ignore[no-untyped-def]
    """Append label, when it ran and when it was due to TASKAPP_LOG (one line per run)."""
    if LOG:
        with open(LOG, "a") as out:
            out.write(f"{label}\t{time.time()}\t{due if due is not None else ''}\n")
    return label


@app.task(name="usersapp.retrying", bind=True, acks_late=True, max_retries=8)
def retrying(self, label: str, times: int) -> str:  # type: ignore[no-untyped-def]
    """The users' retry pattern: log the attempt, retry with a countdown until `times` retries."""
    if LOG:
        with open(LOG, "a") as out:
            out.write(f"{label}#{self.request.retries}\t{time.time()}\t\n")
    if self.request.retries < times:
        raise self.retry(countdown=1)
    return label
