"""The one definition of the task queues, shared by workers (Celery) and the migrator.

RabbitMQ refuses a redeclaration with different arguments (PRECONDITION_FAILED closes the
channel), so the arguments are computed here and nowhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

DEFAULT_QUEUE_NAMES = ("short-running", "long-running", "rate-limited")
#: The AMQP server property (connection.start) the bundled RabbitMQ template announces: how many
#: nodes (REPLICAS) the deployment runs. AMQP itself says nothing about a cluster; `check` reads
#: this to warn when classic queues, which live on one node, are used on several.
REPLICAS_SERVER_PROPERTY = "packit_replicas"


class QueueType(enum.Enum):
    CLASSIC = "classic"
    QUORUM = "quorum"


@dataclass(frozen=True)
class QueueSpec:
    """One durable queue, bound to a direct exchange of the same name (Celery's convention)."""

    name: str
    queue_type: QueueType = QueueType.CLASSIC
    max_priority: int | None = None

    @property
    def exchange(self) -> str:
        return self.name

    @property
    def routing_key(self) -> str:
        return self.name

    @property
    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.queue_type is QueueType.QUORUM:
            args["x-queue-type"] = "quorum"
        if self.max_priority is not None:
            args["x-max-priority"] = self.max_priority
        return args

    def kombu_queue(self) -> Any:
        """The kombu `Queue` Celery workers declare; same arguments as `declare()`."""
        from kombu.entity import Exchange, Queue

        return Queue(  # type: ignore[no-untyped-call]
            self.name,
            Exchange(self.exchange, type="direct", durable=True),  # type: ignore[no-untyped-call]
            routing_key=self.routing_key,
            durable=True,
            queue_arguments=self.arguments or None,
        )

    def declare(self, channel: Any) -> None:
        """Declare exchange, queue and binding on a py-amqp channel exactly as kombu would."""
        channel.exchange_declare(self.exchange, "direct", durable=True, auto_delete=False)
        channel.queue_declare(
            self.name, durable=True, auto_delete=False, arguments=self.arguments or None
        )
        channel.queue_bind(self.name, self.exchange, self.routing_key)


@dataclass(frozen=True)
class QueueSettings:
    """The configured queues; the first is the default queue."""

    names: tuple[str, ...] = DEFAULT_QUEUE_NAMES
    queue_type: QueueType = QueueType.CLASSIC
    max_priority: int | None = None

    def spec(self, name: str) -> QueueSpec:
        """The declaration for `name`, configured or not (the migrator finds extra queues)."""
        return QueueSpec(name, self.queue_type, self.max_priority)

    @property
    def specs(self) -> tuple[QueueSpec, ...]:
        return tuple(self.spec(name) for name in self.names)

    @property
    def default(self) -> QueueSpec:
        return self.spec(self.names[0])
