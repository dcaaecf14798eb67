"""``packit-broker render``: ``oc process`` for people without ``oc`` (or without a cluster).

The output is a ``v1`` List that ``oc apply -f -`` / ``kubectl apply -f -`` accept. The
template's ``message`` (next steps, generated values) goes to stderr so the pipe stays clean.
``--parameters`` lists a template's parameters, as ``oc process --parameters`` does, for those
who installed the wheel and have no ``manifests/`` folder to point ``oc`` at.
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


def _text(value: object) -> str:
    """A parameter's value as ``oc`` shows it (YAML may have parsed ``1`` or ``true``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parameter_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per declared parameter, in the template's order, with what a user must know."""
    rows: list[dict[str, Any]] = []
    for param in document.get("parameters", []) or []:
        generated = param.get("generate") == "expression"
        rows.append(
            {
                "name": str(param["name"]),
                "required": bool(param.get("required")),
                "value": _text(param.get("value")),
                "generate": str(param.get("from", "")) if generated else "",
                "description": " ".join(str(param.get("description", "")).split()),
            }
        )
    return rows


_DEFAULT_WIDTH = 32


def _default_text(row: dict[str, Any]) -> str:
    if row["value"]:
        return str(row["value"])
    if row["generate"]:
        return f"(generated: {row['generate']})"
    return "(required)" if row["required"] else "(empty)"


def _parameters_table(rows: list[dict[str, Any]]) -> str:
    """NAME, REQUIRED, DEFAULT, DESCRIPTION columns; the description, the longest, last.

    A default longer than ``_DEFAULT_WIDTH`` (a worker command) overflows its column rather than
    being cut or pushing every other row's description off the screen.
    """
    header = {"name": "NAME", "required": "REQUIRED", "default": "DEFAULT"}
    cells = [
        {
            "name": row["name"],
            "required": "yes" if row["required"] else "no",
            "default": _default_text(row),
            "description": row["description"],
        }
        for row in rows
    ]
    widths = {key: max(len(c[key]) for c in [header, *cells]) for key in header}
    widths["default"] = min(widths["default"], _DEFAULT_WIDTH)
    lines = []
    for cell in [{**header, "description": "DESCRIPTION"}, *cells]:
        line = "  ".join(f"{cell[key]:<{widths[key]}}" for key in header)
        lines.append(f"{line}  {cell['description']}".rstrip())
    return "\n".join(lines) + "\n"


def _dump(document: Any, output: str) -> str:
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
@click.option(
    "--parameters",
    "list_parameters",
    is_flag=True,
    help="List TEMPLATE's parameters (name, required, default, description), like"
    " 'oc process --parameters', and exit; with -o, as YAML or JSON.",
)
@click.pass_context
def render(
    ctx: click.Context,
    template: str | None,
    params: tuple[str, ...],
    param_file: str | None,
    output: str,
    list_only: bool,
    list_parameters: bool,
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
    if list_parameters:
        if params or param_file:
            raise click.UsageError("--parameters lists the parameters: it takes no -p/--param-file")
        try:
            rows = _parameter_rows(engine.load_template(template))
        except engine.RenderError as exc:
            raise click.UsageError(str(exc)) from exc
        if ctx.get_parameter_source("output") is click.core.ParameterSource.COMMANDLINE:
            click.echo(_dump(rows, output), nl=False)
        else:
            click.echo(_parameters_table(rows), nl=False)
        return
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
