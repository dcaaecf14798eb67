"""``packit-broker render``: ``oc process`` for people without ``oc`` (or without a cluster).

The output is a ``v1`` List that ``oc apply -f -`` / ``kubectl apply -f -`` accept. The
template's ``message`` (next steps, generated values) goes to stderr so the pipe stays clean.
"""

from __future__ import annotations

import json
from typing import Any

import click
import yaml

from packit_broker import render as engine


def _parse_assignments(assignments: tuple[str, ...]) -> dict[str, str]:
    """``NAME=VALUE`` pairs from ``-p``; the value may itself contain ``=``."""
    values: dict[str, str] = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise click.UsageError(f"-p expects NAME=VALUE, got {assignment!r}")
        values[name] = value
    return values


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (rabbitmq.conf, PEM) as readable ``|`` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def _dump(document: dict[str, Any], output: str) -> str:
    if output == "json":
        return json.dumps(document, indent=2) + "\n"
    return yaml.dump(document, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)


@click.command("render")
@click.argument("template", required=False)
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a template parameter; repeatable. Wins over --param-file.",
)
@click.option(
    "--param-file",
    type=click.Path(dir_okay=False),
    help="File of NAME=VALUE lines (# comments allowed), as for oc process.",
)
@click.option(
    "-o", "--output", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True
)
@click.option("--list", "list_only", is_flag=True, help="List the bundled templates and exit.")
def render(
    template: str | None,
    params: tuple[str, ...],
    param_file: str | None,
    output: str,
    list_only: bool,
) -> None:
    """Render TEMPLATE (a bundled name such as 'rabbitmq', or a file) like 'oc process'.

    Example: packit-broker render rabbitmq -p ROUTE_HOST=amqp.example.com | oc apply -f -
    """
    if list_only:
        for name, path in engine.bundled_templates().items():
            click.echo(f"{name}\t{path}")
        return
    if template is None:
        raise click.UsageError("missing argument TEMPLATE (or use --list)")
    values = _parse_assignments(params)
    try:
        document = engine.load_template(template)
        from_file = engine.read_param_file(param_file) if param_file else {}
        merged = {**from_file, **values}
        resolved = engine.resolve_parameters(document, merged)
        rendered = engine.process(document, resolved)
    except engine.RenderError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(_dump(rendered, output), nl=False)
    message = engine.process_message(document, resolved)
    if message.strip():
        click.echo(message.rstrip(), err=True)
