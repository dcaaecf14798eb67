"""The broker-neutral task message every migration direction passes through.

A source decodes what it holds into `TaskMessage`s, a sink encodes them into what it writes:
so Redis -> RabbitMQ, RabbitMQ -> Redis and a continuous bridge share one driver instead of
each knowing the other side's format (see packit_broker/codecs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class MalformedMessage(ValueError):
    """The raw entry cannot become a faithful message; `reason` goes into the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TaskMessage:
    """One Celery task message as the producer sent it, independent of any broker.

    `priority` is on kombu's Redis scale (0 most urgent) as the producer set it; `bucket` is
    the priority step kombu files it under, i.e. the order every broker must keep. `exchange`
    and `routing_key` are where the producer published it (None if the source does not know).
    """

    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any] = field(default_factory=dict)  # basic properties kept as-is
    content_type: str | None = None
    content_encoding: str | None = None
    priority: int = 0
    bucket: int = 0
    exchange: str | None = None
    routing_key: str | None = None

    @property
    def task_id(self) -> str | None:
        task_id = self.headers.get("id")
        return str(task_id) if task_id is not None else None
