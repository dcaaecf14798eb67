"""`packit-broker demo`: the whole cut-over, locally, in one command."""

from __future__ import annotations

import click


@click.command()
@click.option("--keep", is_flag=True, help="Leave the stack up and print the exports to use it.")
def demo(keep: bool) -> None:
    """Start a local stand-in of production, migrate a Redis backlog, run it on a worker.

    Redis, RabbitMQ (TLS only), PostgreSQL 17 (TLS) and an OpenShift-router stand-in run on
    loopback in a temp folder; everything is torn down at the end, also on Ctrl-C.
    """
    from packit_broker.demo.run import run_demo
    from packit_broker.stack import StackError

    try:
        run_demo(keep)
    except StackError as exc:
        raise click.ClickException(f"the demo's local stack could not start:\n{exc}") from None
