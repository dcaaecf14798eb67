"""`packit-broker`: a thin click group; each command lives in packit_broker.commands."""

from __future__ import annotations

import click

from packit_broker import __version__
from packit_broker.commands.demo import demo
from packit_broker.commands.migrate import migrate
from packit_broker.commands.render import render


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="packit-broker")
def cli() -> None:
    """Celery workers in a private cluster; RabbitMQ and PostgreSQL behind OpenShift Routes."""


cli.add_command(migrate)
cli.add_command(render)
cli.add_command(demo)

try:
    from packit_broker.commands.check import check
except ImportError:  # pragma: no cover - while the check command is being written
    pass
else:
    cli.add_command(check)


def main() -> None:
    cli()
