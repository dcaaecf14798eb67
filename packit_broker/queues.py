"""The one definition of the task queues, shared by workers (Celery) and the migrator.

RabbitMQ refuses a redeclaration with different arguments (PRECONDITION_FAILED closes the
channel), so the arguments are computed here and nowhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
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


def quorum_arguments() -> dict[str, Any]:
    """The queue arguments that make a queue a quorum queue (a fresh dict to extend)."""
    return {"x-queue-type": QueueType.QUORUM.value}


def is_quorum(arguments: Mapping[str, Any] | None) -> bool:
    """Whether queue arguments declare a quorum queue."""
    return (arguments or {}).get("x-queue-type") == QueueType.QUORUM.value


#: The queue type of kombu's native delayed delivery queues (`celery_delayed_0..27`), as
#: `celery_config()` sets `broker_native_delayed_delivery_queue_type` and the movers declare them.
DELAYED_DELIVERY_QUEUE_TYPE = "quorum"
#: How often a quorum queue delivers a task before dead-lettering it. RabbitMQ 4.0 made 20 the
#: default and, without a dead-letter target, drops the task after it; a worker crash or a cut
#: connection with the task unacknowledged (`acks_late`) counts as a delivery. Set explicitly so
#: 3.x (unlimited by default) and 4.x behave alike, with a dead-letter queue to keep the task.
DELIVERY_LIMIT = 20
#: `<queue>.dead-letter`: where a quorum queue's task goes after DELIVERY_LIMIT deliveries
#: (by the default exchange; the x-death header says why and from where).
DEAD_LETTER_SUFFIX = ".dead-letter"


@dataclass(frozen=True)
class QueueSpec:
    """One durable queue and the exchange its tasks are published to.

    Classic: a direct exchange of the queue's name (Celery's convention). Quorum: a topic
    exchange `<name>.topic`, because Celery sends a countdown or ETA task through kombu's native
    delayed delivery only when the queue's exchange is topic or fanout; with a direct one the
    worker holds the task unacknowledged until it is due, and with `--prefetch-multiplier=1`
    every other task waits behind it. The new name leaves an older direct exchange of the
    queue's name (and the producers still publishing to it) working during an upgrade.
    """

    name: str
    queue_type: QueueType = QueueType.CLASSIC
    max_priority: int | None = None

    @property
    def exchange(self) -> str:
        return f"{self.name}.topic" if self.queue_type is QueueType.QUORUM else self.name

    @property
    def exchange_type(self) -> str:
        return "topic" if self.queue_type is QueueType.QUORUM else "direct"

    @property
    def delayed_delivery(self) -> bool:
        """Whether countdown tasks reach this queue through kombu's delayed-delivery queues."""
        return self.queue_type is QueueType.QUORUM

    @property
    def routing_key(self) -> str:
        return self.name

    @property
    def dead_letter_queue(self) -> str | None:
        """The queue this one dead-letters into (quorum queues only), or None."""
        return self.name + DEAD_LETTER_SUFFIX if self.queue_type is QueueType.QUORUM else None

    @property
    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.queue_type is QueueType.QUORUM:
            args.update(quorum_arguments())
            # Queue arguments, not a policy: an operator's own policy (max-length, say) would
            # replace a policy of ours whole, and `check` can verify arguments over AMQP.
            args["x-delivery-limit"] = DELIVERY_LIMIT
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = self.dead_letter_queue
        if self.max_priority is not None:
            args["x-max-priority"] = self.max_priority
        return args

    def declare_dead_letter(self, channel: Any) -> None:
        """Declare the dead-letter queue (quorum, nothing bound but the default exchange)."""
        if self.dead_letter_queue is not None:
            channel.queue_declare(
                self.dead_letter_queue,
                durable=True,
                auto_delete=False,
                arguments=quorum_arguments(),
            )

    def kombu_queue(self) -> Any:
        """The kombu `Queue` Celery workers declare; same arguments as `declare()`."""
        from kombu.entity import Exchange, Queue

        return Queue(  # type: ignore[no-untyped-call]
            self.name,
            Exchange(self.exchange, type=self.exchange_type, durable=True),  # type: ignore[no-untyped-call]
            routing_key=self.routing_key,
            durable=True,
            queue_arguments=self.arguments or None,
        )

    def declare(self, channel: Any) -> None:
        """Declare exchange, queue and binding on a py-amqp channel exactly as kombu would
        (and the dead-letter queue first, so that nothing is dead-lettered into nowhere)."""
        self.declare_dead_letter(channel)
        channel.exchange_declare(self.exchange, self.exchange_type, durable=True, auto_delete=False)
        self.declare_queue(channel)
        channel.queue_bind(self.name, self.exchange, self.routing_key)

    def declare_queue(self, channel: Any, arguments: Mapping[str, Any] | None = None) -> None:
        """The queue alone, with its own arguments (or `arguments`): a no-op on a queue that
        exists with the same ones, PRECONDITION_FAILED on one with others."""
        wanted = self.arguments if arguments is None else arguments
        channel.queue_declare(
            self.name, durable=True, auto_delete=False, arguments=dict(wanted) or None
        )


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
