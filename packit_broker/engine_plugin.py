"""The SQLAlchemy plugin that binds packit-broker's connection arguments to one URL.

Registered by `packit_broker.database.engine_options()` (so only processes that build the
settings import SQLAlchemy for it). SQLAlchemy hands every plugin named in `plugins` the URL
and the keyword arguments of `create_engine`; this one always takes its own argument out of
them (so sqlite or another driver never sees it) and hooks `do_connect` only when the URL is
the one the builder made.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, CreateEnginePlugin, Engine

from packit_broker.database import PLUGIN_ARGUMENT, BoundConnection

log = logging.getLogger(__name__)


class BindConnectionPlugin(CreateEnginePlugin):
    """Adds a `BoundConnection`'s keywords to the connections of an engine for its URL only."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        bound = kwargs.pop(PLUGIN_ARGUMENT, None)
        self.bound: BoundConnection | None = None
        if isinstance(bound, BoundConnection) and bound.matches(url):
            self.bound = bound
        elif bound is not None:
            log.debug(
                "engine URL %s is not the one celery_config()/sqlalchemy_engine() built (%s):"
                " its connection settings are left out",
                url,
                bound.url,
            )

    def update_url(self, url: URL) -> URL:
        return url  # the URL stays exactly what the app set

    def engine_created(self, engine: Engine) -> None:
        if self.bound is not None:
            event.listen(engine, "do_connect", self.bound.on_connect)
