"""The demo's "private cluster" Celery app: configured by `celery_config()` and nothing else."""

from __future__ import annotations

from typing import Any

from celery import Celery

from packit_broker import celery_config

app = Celery("packit_demo")
app.conf.update(celery_config())
app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True)


@app.task(name="packit_demo.process_event", bind=True)  # type: ignore[untyped-decorator]
def process_event(self: Any, label: str) -> str:
    """Stands in for packit's tasks; the result goes to PostgreSQL through the router."""
    return f"{label} handled on {self.request.delivery_info.get('routing_key')}"
