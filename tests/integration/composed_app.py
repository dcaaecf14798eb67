"""A Celery app that composes: `celery_config()`, then a `result_backend` of its own.

Every process of the app (worker, producer) builds it with `make_app`, as the docs require;
`celery -A tests.integration.composed_app worker` reads the override from
COMPOSED_RESULT_BACKEND.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from celery import Celery

from packit_broker import celery_config


def multiply(x: int, y: int) -> int:
    return x * y


def make_app(environ: Mapping[str, str], result_backend: str) -> Celery:
    app = Celery("composed")
    app.conf.update(celery_config(environ))
    app.conf.update(result_backend=result_backend)  # the app's own choice, set afterwards
    app.task(name="composed.multiply")(multiply)
    return app


if os.environ.get("COMPOSED_RESULT_BACKEND"):
    app = make_app(os.environ, os.environ["COMPOSED_RESULT_BACKEND"])
