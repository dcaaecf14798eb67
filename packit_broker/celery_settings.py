"""Endpoints -> the dict for Celery's `app.conf.update(...)`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from packit_broker import celery_worker
from packit_broker.config import (
    RESULT_BACKEND_PREFIX,
    BrokerEndpoint,
    broker_from_env,
    database_from_env,
    queues_from_env,
)
from packit_broker.database import engine_options, sqlalchemy_url
from packit_broker.queues import DELAYED_DELIVERY_QUEUE_TYPE, QueueSettings
from packit_broker.recovery import recovery_settings
from packit_broker.tls import amqp_ssl_options


def broker_url(broker: BrokerEndpoint) -> str:
    """The URL py-amqp dials: the CONNECT_TO address if any; SNI comes from the ssl dict."""
    dial = broker.dial
    host = f"[{dial.host}]" if ":" in dial.host else dial.host
    scheme = "amqps" if broker.tls else "amqp"
    user, password = quote(broker.username, safe=""), quote(broker.password, safe="")
    return f"{scheme}://{user}:{password}@{host}:{dial.port}/{quote(broker.vhost, safe='')}"


def broker_settings(broker: BrokerEndpoint) -> dict[str, Any]:
    return {
        "broker_url": broker_url(broker),
        "broker_use_ssl": amqp_ssl_options(broker.tls) if broker.tls else False,
        "broker_heartbeat": broker.heartbeat,
        "broker_connection_retry": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {"confirm_publish": True},
    }


def queue_settings(queues: QueueSettings) -> dict[str, Any]:
    default = queues.default
    return {
        "task_queues": tuple(spec.kombu_queue() for spec in queues.specs),
        "task_default_queue": default.name,
        "task_default_exchange": default.exchange,
        "task_default_exchange_type": default.exchange_type,
        "task_default_routing_key": default.routing_key,
        "task_default_queue_type": queues.queue_type.value,
        "task_create_missing_queues": False,
        "broker_native_delayed_delivery_queue_type": DELAYED_DELIVERY_QUEUE_TYPE,
    }


def control_settings() -> dict[str, Any]:
    """Remote control and events on exclusive queues: RabbitMQ 4.3 refuses transient
    non-exclusive ones by default (`deprecated_features.permit.transient_nonexcl_queues`), and
    Celery's pidbox, reply and `celeryev` queues were such queues before Celery 5.7."""
    return {"control_queue_exclusive": True, "event_queue_exclusive": True}


def result_backend_settings(environ: Mapping[str, str] | None) -> dict[str, Any]:
    db = database_from_env(environ, RESULT_BACKEND_PREFIX)
    if db is None:
        return {}
    backend = "db+" + sqlalchemy_url(db)
    celery_worker.own_backend(backend)
    return {
        "result_backend": backend,
        "database_engine_options": engine_options(db),
        "result_backend_always_retry": True,
    }


def celery_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything for `app.conf.update(...)`: broker over TLS+SNI, queues, result backend.

    Also registers `packit_broker.celery_worker`'s worker hook, without which a gevent or
    eventlet worker stalls with these settings (publisher confirms and heartbeats both on).
    """
    celery_worker.install()
    config = broker_settings(broker_from_env(environ))
    config.update(recovery_settings(config))  # bounded recovery from a node loss or a cut
    config.update(queue_settings(queues_from_env(environ)))
    config.update(control_settings())
    config.update(result_backend_settings(environ))
    return config
