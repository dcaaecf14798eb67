"""Endpoint -> `pika.ConnectionParameters` for the users' pika consumers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from packit_broker.config import broker_from_env
from packit_broker.tls import ssl_context


def pika_parameters(environ: Mapping[str, str] | None = None, **overrides: Any) -> Any:
    """Same endpoint, SNI and CA as `celery_config()`; `overrides` go to ConnectionParameters."""
    import pika

    broker = broker_from_env(environ)
    ssl_options = (
        pika.SSLOptions(ssl_context(broker.tls), server_hostname=broker.tls.server_hostname)
        if broker.tls
        else None
    )
    options: dict[str, Any] = {
        "host": broker.dial.host,
        "port": broker.dial.port,
        "virtual_host": broker.vhost,
        "credentials": pika.PlainCredentials(broker.username, broker.password),
        "ssl_options": ssl_options,
        "heartbeat": broker.heartbeat,
    }
    options.update(overrides)
    return pika.ConnectionParameters(**options)
