"""packit-broker: Celery workers in a private cluster, broker and database behind a Route.

Public API: `celery_config`, `pika_parameters`, `sqlalchemy_engine`, `ConfigError`.
"""

from packit_broker.celery_settings import celery_config
from packit_broker.config import ConfigError
from packit_broker.database import sqlalchemy_engine
from packit_broker.pika_settings import pika_parameters

__all__ = ["ConfigError", "celery_config", "pika_parameters", "sqlalchemy_engine"]
__version__ = "0.2.0.dev0"
