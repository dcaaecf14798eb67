"""Move pending Celery messages from Redis to RabbitMQ, losing none (see docs/migrate.md)."""

from packit_broker.migrate.report import Report
from packit_broker.migrate.run import (
    MigrateOptions,
    Migration,
    Plan,
    Refused,
    make_plan,
)

__all__ = ["MigrateOptions", "Migration", "Plan", "Refused", "Report", "make_plan"]
