"""The local stand-in of production: Redis, RabbitMQ (TLS only), PostgreSQL 17 (TLS) and an
HAProxy configured like the OpenShift router, on loopback in a temp folder.

One implementation serves the test fixtures and `packit-broker demo`.
"""

from packit_broker.stack.processes import StackError
from packit_broker.stack.stack import Stack

__all__ = ["Stack", "StackError"]
