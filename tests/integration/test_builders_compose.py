"""Issue 9: an app that overrides `result_backend` after `celery_config()` gets what it set.

Real Celery workers and producers; the override is (a) another PostgreSQL server as far as the
builder knows (the rig's server dialled directly, another database and user) and (b) sqlite.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

from packit_broker import celery_config
from packit_broker.database import PLUGIN_ARGUMENT
from packit_broker.stack import Stack
from tests.integration.composed_app import make_app
from tests.integration.workers import celery_worker

pytestmark = pytest.mark.integration

Lookup = Callable[[str], str | None]


def _postgres_status(params: dict[str, str], task_id: str) -> str | None:
    conn = psycopg2.connect(**params)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('celery_taskmeta') IS NOT NULL")
            row = cur.fetchone()
            if not row or not row[0]:
                return None
            cur.execute("SELECT status FROM celery_taskmeta WHERE task_id = %s", (task_id,))
            found = cur.fetchone()
            return str(found[0]) if found else None
    finally:
        conn.close()


@pytest.fixture
def other_postgres(stack: Stack) -> Iterator[tuple[str, Lookup]]:
    """A database and user of their own on the rig's server, dialled directly (no router)."""
    tag = uuid.uuid4().hex[:8]
    user, password, dbname = f"other_{tag}", f"Other-{uuid.uuid4().hex}", f"other_{tag}"
    admin = psycopg2.connect(**stack.postgres_direct_params())
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE ROLE "{user}" LOGIN PASSWORD %s', (password,))
        cur.execute(f'CREATE DATABASE "{dbname}" OWNER "{user}"')
    url = (
        f"db+postgresql+psycopg2://{user}:{password}@127.0.0.1:{stack.postgres_port}/{dbname}"
        f"?sslmode=verify-full&sslrootcert={stack.pki.ca_file}"
    )
    params = stack.postgres_direct_params(dbname)
    try:
        yield url, lambda task_id: _postgres_status(params, task_id)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            cur.execute(f'DROP ROLE IF EXISTS "{user}"')
        admin.close()


def _sqlite_status(path: Path, task_id: str) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        row = conn.execute("SELECT status FROM celery_taskmeta WHERE task_id = ?", (task_id,))
        found = row.fetchone()
    return str(found[0]) if found else None


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_an_overridden_result_backend_gets_what_the_app_set(
    request: pytest.FixtureRequest,
    stack: Stack,
    client_env: dict[str, str],
    queue_names: tuple[str, ...],
    tmp_path: Path,
    kind: str,
) -> None:
    if kind == "postgresql":
        backend, status = request.getfixturevalue("other_postgres")
    else:
        path = tmp_path / "results.sqlite"
        backend = f"db+sqlite:///{path}"

        def status(task_id: str) -> str | None:
            return _sqlite_status(path, task_id)

    producer = make_app(client_env, backend)
    worker_env = {**client_env, "COMPOSED_RESULT_BACKEND": backend}
    with celery_worker(
        worker_env, [queue_names[0]], tmp_path / "worker.log", "tests.integration.composed_app"
    ):
        result = producer.send_task("composed.multiply", (6, 7), queue=queue_names[0])
        assert result.get(timeout=90) == 42
    assert status(result.id) == "SUCCESS"
    # ... and nothing went to the builder's database behind the router.
    builder = celery_config(client_env)["database_engine_options"][PLUGIN_ARGUMENT].db
    assert _postgres_status(stack.postgres_direct_params(builder.dbname), result.id) is None
