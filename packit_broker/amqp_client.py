"""py-amqp's Connection, keeping what RabbitMQ says when it blocks publishers.

RabbitMQ sends `connection.blocked` with a reason ("low on memory", "low on disk") when a
resource alarm stops it from reading publishers' sockets; py-amqp declares the method without
its argument and passes a fixed text instead. `migrate` and `check` both need the real reason
to tell a memory alarm from a disk alarm (and both from a network fault).
"""

from __future__ import annotations

from typing import Any, ClassVar

import amqp
from amqp import spec


class BlockAwareConnection(amqp.Connection):  # type: ignore[misc]
    _METHODS: ClassVar[dict[Any, Any]] = {
        **amqp.Connection._METHODS,
        spec.Connection.Blocked: spec.method(spec.Connection.Blocked, "s"),
    }

    def _on_blocked(self, reason: str = "connection blocked") -> Any:
        if self.on_blocked:
            return self.on_blocked(reason)
        return None
