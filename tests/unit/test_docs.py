"""Docs as tests: every shell command in README.md and docs/*.md must work when pasted.

An SRE following the docs literally met commands that did not work (an option that did not
exist, a `db+postgresql://` result backend that `celery_config()` refuses, a `--report` path
under a missing folder). This test reads every fenced block whose info string is a shell
(`sh`, `bash`, `shell`, `console`), splits it into simple commands as a POSIX shell would
(quotes, `\\` continuations, `$(...)`, pipes, `;`, `&&`, redirections) and checks each one
without a network:

* `packit-broker ...` (also `.venv/bin/packit-broker`, `python -m packit_broker`): parsed by the
  real click command tree, then the values the code validates are validated by that code
  (`celery_config()`, `broker_from_env`, `database_from_env`, `queues_from_env`,
  `redis_from_url`, `KombuLayout.from_json`), with the environment the block's `export`s and
  `NAME=value` prefixes built; `render` is rendered and its pods' commands and environment
  checked the same way.
* `oc process -f manifests/X.yaml -p NAME=VALUE` / `--param-file`: the template is bundled and
  rendered like `render`; other `oc` commands need a known subcommand.
* `./dev TARGET`, `make TARGET`, `scripts/...`: the target or file exists.
* `celery ...`: the subcommand and every option exist in `celery SUB --help` of this venv
  (read once per session), and the app is given with `-A` (the docs' rule: every process
  loads the app module that calls `celery_config()`).
* anything else must be a command listed in `KNOWN_COMMANDS`, so a block of output marked
  `sh` fails; output is marked `text`, and a fenced block without an info string fails too.

Placeholders (`USER`, `HOST`, `...`, `{...}`, `…`) are filled with sample values and then
validated, never skipped: `db+postgresql://...` stays a `db+postgresql://` URL and fails.
In a `console` block only `$ ` lines (and their continuations) are commands.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import click
import pytest
import yaml

from packit_broker import celery_config
from packit_broker import render as engine
from packit_broker.cli import cli
from packit_broker.config import (
    DATABASE_PREFIX,
    RESULT_BACKEND_PREFIX,
    ConfigError,
    broker_from_env,
    database_from_env,
    queues_from_env,
    redis_from_url,
)
from packit_broker.kombu_layout import KombuLayout, LayoutError

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_INFOS = frozenset({"sh", "bash", "shell", "console"})

#: Commands the docs may use that this test does not check further (real tools; a name not
#: here is an error, so an output block marked `sh` or a typo in a command name fails).
KNOWN_COMMANDS = frozenset(
    {
        "base64", "bash", "cat", "cd", "chmod", "curl", "echo", "exec", "export", "git", "grep",
        "jq", "kill", "ls", "mkdir", "mktemp", "openssl", "printf", "rabbitmq-diagnostics",
        "rabbitmq-queues", "rabbitmq-upgrade", "rabbitmqctl", "redis-cli", "rm", "set", "sh",
        "sleep", "umask", "unset", "wait", "which", "command", "true", "type", "source", ".",
        "python3", "python", ".venv/bin/python", "pip", ".venv/bin/pip", "psql", "eval",
        "podman", "docker", "buildah", "skopeo",
    }
)  # fmt: skip
#: Programs a virtualenv's bin/ holds, called by the full path (the README's Install).
VENV_PROGRAMS = frozenset({"packit-broker", "celery", "python", "python3", "pip"})
OC_SUBCOMMANDS = frozenset(
    {
        "adm", "annotate", "apply", "create", "delete", "describe", "edit", "exec", "explain",
        "expose", "extract", "get", "label", "login", "logs", "new-project", "patch",
        "port-forward", "process", "project", "rollout", "rsh", "scale", "set", "wait",
        "whoami", "debug",
    }
)  # fmt: skip
#: `celery` subcommands this venv does not have (Flower is a plugin): the options the docs
#: use, from Flower 2.2's `flower --help`.
CELERY_PLUGIN_OPTIONS = {
    "flower": {"--broker_api": True, "--port": True, "--address": True, "--url_prefix": True}
}
#: Subcommands that connect to the broker: without the app module they send no SNI.
CELERY_NEEDS_APP = frozenset({"worker", "beat", "flower", "inspect", "status", "control"})

# -- sample values for placeholders --------------------------------------------------------

SAMPLE_AUTHORITY = {
    "amqps": "packit:PASSWORD@rabbitmq.apps.example.com:443/",
    "amqp": "packit:PASSWORD@127.0.0.1:5672/",
    "redis": ":PASSWORD@redis:6379/0",
    "rediss": ":PASSWORD@redis.example.com:6380/0",
    "postgresql": "packit:PASSWORD@postgres.apps.example.com:443/packit",
    "postgres": "packit:PASSWORD@postgres.apps.example.com:443/packit",
}
#: A variable whose whole value is a placeholder (`...`) gets this.
SAMPLE_VALUES = {
    "PACKIT_BROKER_URL": "amqps://" + SAMPLE_AUTHORITY["amqps"],
    "PACKIT_MIGRATE_FROM": "redis://" + SAMPLE_AUTHORITY["redis"],
    "PACKIT_MIGRATE_TO": "redis://" + SAMPLE_AUTHORITY["redis"],
    "PACKIT_DATABASE_URL": "postgresql://" + SAMPLE_AUTHORITY["postgresql"],
    "PACKIT_RESULT_BACKEND_URL": "postgresql://" + SAMPLE_AUTHORITY["postgresql"],
    "PACKIT_BROKER_QUEUES": "short-running,long-running,rate-limited",
    "PACKIT_BROKER_QUEUE_TYPE": "classic",
    "PACKIT_MIGRATE_TRANSPORT_OPTIONS": "{}",
}
#: Upper-case placeholder words inside a value.
SAMPLE_WORDS = {
    "ROUTE_HOST": "route.apps.example.com",
    "HOST": "host.example.com",
    "USER": "packit",
    "PORT": "443",
    "DB": "packit",
    "DBNAME": "packit",
    "VHOST": "packit",
    "ADDRESS": "10.0.0.5",
}
#: What `. ./packit.env` (a file of the reader's own) is taken to hold.
SOURCED_FILE_ENV = {
    "PACKIT_BROKER_URL": SAMPLE_VALUES["PACKIT_BROKER_URL"],
    "PACKIT_MIGRATE_FROM": SAMPLE_VALUES["PACKIT_MIGRATE_FROM"],
}


class DocProblem(Exception):
    """A command in the docs that would not work; the message says why."""


# -- fenced blocks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    info: str
    lines: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> Iterator[Block]:
    """Every fenced block of a Markdown file, its indentation (a list item's) removed."""
    fence = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = fence.match(lines[i])
        if not match:
            i += 1
            continue
        indent, marker, info = match.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != marker:
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        yield Block(path, start, info, tuple(body))
        i += 1


def script_of(block: Block) -> list[tuple[int, str]]:
    """(line number, line) of what a reader pastes into a shell; `console` keeps `$ ` lines."""
    out: list[tuple[int, str]] = []
    continued = False
    for offset, text in enumerate(block.lines, start=block.line + 1):
        if block.info == "console":
            if text.startswith("$ "):
                out.append((offset, text[2:]))
            elif continued:
                out.append((offset, text))
            else:
                continue
        else:
            if text.startswith("$ "):
                raise DocProblem(
                    f"{block.path.relative_to(REPO)}:{offset}: a `$ ` prompt in an {block.info}"
                    f" block does not paste; drop it, or mark the block `console`\n    {text}"
                )
            out.append((offset, text))
        continued = text.rstrip().endswith("\\")
    if block.info == "console" and not out:
        raise DocProblem(f"{block.where}: a console block without a `$ ` command: mark it text")
    return out


# -- a small POSIX shell tokenizer ------------------------------------------------------------

_OPERATORS = ("&&", "||", ";;", "|", ";", "&", "(", ")")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_MARK = "\x00"  # around a variable name to expand at run time (not in single quotes)
_SUBST = "SUBSTITUTED"  # what a `$(...)` stands for


@dataclass
class Token:
    kind: str  # word | op | redirect | newline
    text: str
    line: int


@dataclass
class Command:
    words: list[str]
    line: int
    redirects: list[tuple[str, str]] = field(default_factory=list)
    follows: str = ""  # the operator before it ("|" when it reads a pipe)


def _read_balanced(text: str, i: int) -> int:
    """Index just past the `)` that closes the `$(` whose `(` is at text[i - 1]."""
    depth = 1
    while i < len(text):
        c = text[i]
        if c == "'":
            i = text.index("'", i + 1)
        elif c == '"':
            i += 1
            while text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c == "\\":
            i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise DocProblem("unbalanced $(")


def tokenize(text: str, first_line: int, substitutions: list[tuple[str, int]]) -> list[Token]:
    """Words, operators, redirections; `$(...)` bodies go to *substitutions* to check too."""
    tokens: list[Token] = []
    word: list[str] | None = None
    line = first_line
    i = 0

    def end_word() -> None:
        nonlocal word
        if word is not None:
            tokens.append(Token("word", "".join(word), line))
            word = None

    def dollar(j: int) -> int:
        """A `$` at j inside a word: a substitution, a variable, or a plain `$`."""
        assert word is not None
        if text.startswith("$(", j):
            end = _read_balanced(text, j + 2)
            substitutions.append((text[j + 2 : end - 1], line))
            word.append(_SUBST)
            return end
        var = _VAR.match(text, j)
        if var:
            word.append(_MARK + (var.group(1) or var.group(2)) + _MARK)
            return var.end()
        word.append("$")
        return j + 1

    while i < len(text):
        c = text[i]
        if c == "\\" and text.startswith("\\\n", i):
            i += 2
            line += 1
        elif c in " \t":
            end_word()
            i += 1
        elif c == "\n":
            end_word()
            tokens.append(Token("newline", "\n", line))
            line += 1
            i += 1
        elif c == "#" and word is None:
            while i < len(text) and text[i] != "\n":
                i += 1
        elif c in "<>" or (c == "&" and text.startswith("&>", i)):
            if word is not None and "".join(word).isdigit():
                word = None  # 2> : the descriptor
            end_word()
            op = re.match(r"&>>?|>>|>&|<<|>|<", text[i:])
            assert op
            if op.group() == "<<":
                raise DocProblem("here-documents are not supported by this test")
            tokens.append(Token("redirect", op.group(), line))
            i += len(op.group())
        elif any(text.startswith(op, i) for op in _OPERATORS):
            end_word()
            op_text = next(op for op in _OPERATORS if text.startswith(op, i))
            tokens.append(Token("op", op_text, line))
            i += len(op_text)
        else:
            if word is None:
                word = []
            if c == "'":
                end = text.index("'", i + 1)
                word.append(text[i + 1 : end])
                i = end + 1
            elif c == '"':
                i += 1
                while text[i] != '"':
                    if text[i] == "\\" and text[i + 1] in '"\\$`':
                        word.append(text[i + 1])
                        i += 2
                    elif text[i] == "$":
                        i = dollar(i)
                    else:
                        if text[i] == "\n":
                            line += 1
                        word.append(text[i])
                        i += 1
                i += 1
            elif c == "\\":
                word.append(text[i + 1])
                i += 2
            elif c == "$":
                i = dollar(i)
            else:
                word.append(c)
                i += 1
    end_word()
    return tokens


def commands_of(tokens: list[Token]) -> list[Command]:
    """Simple commands, with their redirections; shell keywords and `{ }` taken off."""
    commands: list[Command] = []
    current: Command | None = None
    follows = ""
    pending_redirect: str | None = None
    for token in tokens:
        if token.kind == "word":
            if pending_redirect is not None:
                assert current is not None
                current.redirects.append((pending_redirect, token.text))
                pending_redirect = None
                continue
            if current is None:
                current = Command([], token.line, follows=follows)
            current.words.append(token.text)
        elif token.kind == "redirect":
            if current is None:
                current = Command([], token.line, follows=follows)
            pending_redirect = token.text
        else:
            if current is not None:
                commands.append(current)
            current = None
            follows = token.text
    if current is not None:
        commands.append(current)
    simple = []
    for command in commands:
        words = command.words
        while words and words[0] in ("{", "}", "do", "then", "else", "!", "time"):
            words.pop(0)
        while words and words[-1] == "}":
            words.pop()
        if not words or words[0] in ("done", "fi", "esac", "for", "while", "if", "case"):
            if words[:1] in (["while"], ["if"]):
                simple.append(Command(words[1:], command.line, command.redirects, command.follows))
            continue
        simple.append(command)
    return simple


# -- running a block: the state a shell would have ---------------------------------------------


@dataclass
class Shell:
    """What earlier lines of the same page set: variables, functions, files written."""

    variables: dict[str, str] = field(default_factory=dict)
    functions: set[str] = field(default_factory=set)
    files: dict[str, str] = field(default_factory=dict)
    #: in a container: the folders it may write (None: this machine's file system)
    writable: tuple[str, ...] | None = None
    only_checked: bool = False  # a template's command: only packit-broker and celery lines
    inline: bool = False  # a command named in prose: its context supplies required options
    checked: int = 0

    def expand(self, word: str) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            return self.variables.get(name, "$" + name)

        return re.sub(f"{_MARK}([A-Za-z0-9_]+){_MARK}", value, word)


def run_script(script: str, first_line: int, shell: Shell) -> None:
    """Check every command of *script*, including those inside `$(...)`."""
    substitutions: list[tuple[str, int]] = []
    tokens = tokenize(script, first_line, substitutions)
    _define_functions(tokens, shell)
    for command in commands_of(tokens):
        try:
            run_command(command, shell)
        except DocProblem as exc:
            raise DocProblem(f"line {command.line}: {exc}") from None
    for inner, line in substitutions:
        run_script(inner, line, shell)


def _define_functions(tokens: list[Token], shell: Shell) -> None:
    """`name() { ...; }`: a word, then `(` and `)`."""
    for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False):
        if a.kind == "word" and (b.text, c.text) == ("(", ")"):
            shell.functions.add(a.text)


_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)


def run_command(command: Command, shell: Shell) -> None:
    words = [shell.expand(w) for w in command.words]
    prefix: dict[str, str] = {}
    while words and _ASSIGNMENT.match(words[0]):
        name, value = _ASSIGNMENT.match(words[0]).groups()  # type: ignore[union-attr]
        prefix[name] = value
        words.pop(0)
    if not words:
        shell.variables.update(prefix)
        validate_environment(shell.variables)
        return
    if words[0] == "exec" and len(words) > 1:
        words.pop(0)
    if words[0] in shell.functions:
        return
    env = {**shell.variables, **prefix}
    name, args = words[0], words[1:]
    if "/" in name and Path(name).name in VENV_PROGRAMS and Path(name).parent.name == "bin":
        name = Path(name).name  # ~/.local/packit-broker/bin/pip: a virtualenv's own
    if name in ("packit-broker", ".venv/bin/packit-broker"):
        shell.checked += 1
        check_packit_broker(args, env, shell)
    elif name in ("python", "python3", ".venv/bin/python") and args[:2] == ["-m", "packit_broker"]:
        shell.checked += 1
        check_packit_broker(args[2:], env, shell)
    elif name in ("celery", ".venv/bin/celery"):
        shell.checked += 1
        validate_environment(env)
        check_celery(args)
    elif shell.only_checked:
        return
    elif name == "oc":
        check_oc(args, shell)
    elif name in ("podman", "docker", "buildah") and args[:1] == ["build"]:
        check_image_build(args[1:])
    elif name == "./dev":
        check_dev(args, env, shell)
    elif name == "make":
        check_make(args)
    elif name in ("bash", "sh") and args[:1] == ["-c"] and len(args) > 1:
        run_script(args[1], command.line, shell)
    elif name.startswith(("scripts/", "./scripts/", "tests/", "bench/")) or (
        name in ("bash", "sh") and args and not args[0].startswith("-")
    ):
        script = args[0] if name in ("bash", "sh") else name
        if not (REPO / script).is_file():
            raise DocProblem(f"{script}: no such file in the repository")
    elif name == "export":
        for word in args:
            match = _ASSIGNMENT.match(word)
            if match:
                shell.variables[match.group(1)] = match.group(2)
        validate_environment(shell.variables)
    elif name in (".", "source"):
        if not (REPO / args[0]).is_file():
            # The reader's own file (a 0600 env file): take it to hold the usual settings.
            for key, value in SOURCED_FILE_ENV.items():
                shell.variables.setdefault(key, value)
    elif name == "printf":
        for op, target in command.redirects:
            if op in (">", ">>"):
                shell.files[target] = _printf(args)
    elif name in ("python", "python3", ".venv/bin/python") and args[:1] == ["-m"]:
        module = args[1]
        if (
            module.startswith("bench.")
            and not (REPO / (module.replace(".", "/") + ".py")).is_file()
        ):
            raise DocProblem(f"python -m {module}: no such module in the repository")
    elif name not in KNOWN_COMMANDS:
        raise DocProblem(
            f"unknown command {name!r}: a typo, output that should be in a `text` block, or a"
            " real tool to add to KNOWN_COMMANDS in tests/unit/test_docs.py"
        )


def _printf(args: list[str]) -> str:
    """`printf '%s\\n' A B` (the only form the docs use to write a file): its output."""
    if not args or args[0] != "%s\\n":
        raise DocProblem("printf to a file: only `printf '%s\\n' LINE...` is understood here")
    return "".join(arg + "\n" for arg in args[1:])


# -- filling placeholders and validating values -------------------------------------------------


def fill(variable: str, value: str) -> str:
    """*value* with its placeholders replaced by sample values (never skipped)."""
    value = value.replace("…", "...")
    value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", "sample", value)  # Kubernetes' $(VAR)
    if value.strip() == "...":
        if variable not in SAMPLE_VALUES:
            raise DocProblem(f"{variable}=...: no sample value for it in the test; write one")
        return SAMPLE_VALUES[variable]
    value = value.replace("{...}", "{}")
    url = re.match(r"^([a-z+]+)://\.\.\.(.*)$", value)
    if url:
        scheme = url.group(1)
        authority = SAMPLE_AUTHORITY.get(scheme.split("+")[-1], "...")
        value = f"{scheme}://{authority}{url.group(2)}"
    if "://" in value:
        for word, sample in SAMPLE_WORDS.items():
            value = re.sub(rf"(?<![A-Za-z0-9_]){word}(?![A-Za-z0-9_])", sample, value)
    return value


@functools.cache
def _sample_file() -> str:
    """A readable file for every `*_FILE` setting (the reader's CA bundle, key, ...)."""
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    path = folder / f"packit-docs-test-{os.getpid()}.pem"
    path.write_text("sample\n")
    return str(path)


def validate_environment(env: Mapping[str, str]) -> None:
    """The `PACKIT_*` settings in *env*, validated by the code that reads them."""
    packit = {k: v for k, v in env.items() if k.startswith("PACKIT_")}
    if not packit:
        return
    filled = {k: _sample_file() if k.endswith("_FILE") else fill(k, v) for k, v in packit.items()}
    try:
        if "PACKIT_BROKER_URL" in filled:
            celery_config(filled)  # broker, queues and the result backend, as the workers do
        else:
            queues_from_env(filled)
            database_from_env(filled, RESULT_BACKEND_PREFIX)
        database_from_env(filled, DATABASE_PREFIX)
        for variable in ("PACKIT_MIGRATE_FROM", "PACKIT_MIGRATE_TO"):
            if filled.get(variable, "").strip():
                _endpoint(variable, filled[variable], filled)
        if "PACKIT_MIGRATE_TRANSPORT_OPTIONS" in filled:
            KombuLayout.from_json(filled["PACKIT_MIGRATE_TRANSPORT_OPTIONS"] or "{}")
    except (ConfigError, LayoutError) as exc:
        raise DocProblem(f"refused by packit-broker: {exc}") from None


def _endpoint(variable: str, url: str, env: Mapping[str, str]) -> None:
    """A `migrate` source or destination: RabbitMQ (parsed as PACKIT_BROKER_URL) or Redis."""
    if url.split("://")[0] in ("amqp", "amqps"):
        broker_from_env({**env, "PACKIT_BROKER_URL": url})
    else:
        redis_from_url(url, variable)


# -- packit-broker -----------------------------------------------------------------------------


def check_packit_broker(args: list[str], env: Mapping[str, str], shell: Shell) -> None:
    """Parse with the real click tree (types and ranges included), then check the values."""
    if not args or args[0] in ("--help", "-h", "--version"):
        return
    name, rest = args[0], args[1:]
    group = click.Context(cli, info_name="packit-broker")
    command = cli.get_command(group, name)
    if command is None:
        raise DocProblem(f"packit-broker has no command {name!r}")
    try:
        with mock.patch.dict(os.environ, dict(env), clear=True):
            ctx = command.make_context(name, list(rest), parent=group)
    except click.exceptions.Exit:
        return  # --help
    except click.MissingParameter:
        if shell.inline:
            return
        raise
    except click.ClickException as exc:
        raise DocProblem(f"packit-broker {name}: {exc.format_message()}") from None
    params = ctx.params
    if name == "check":
        flags = {
            "PACKIT_BROKER_URL": params["broker_url"],
            "PACKIT_BROKER_CA_FILE": params["ca_file"],
            "PACKIT_BROKER_CONNECT_TO": params["connect_to"],
        }
        validate_environment({**env, **{k: v for k, v in flags.items() if v}})
    elif name == "migrate":
        check_migrate(params, env, shell)
    elif name == "render":
        check_render(params, shell)


def check_migrate(params: Mapping[str, Any], env: Mapping[str, str], shell: Shell) -> None:
    if (params["until_idle"] is not None or params["metrics_port"] is not None) and not params[
        "follow"
    ]:
        raise DocProblem("--until-idle and --metrics-port need --follow")
    overrides = {
        "PACKIT_BROKER_CA_FILE": params["ca_file"],
        "PACKIT_BROKER_CERT_FILE": params["cert_file"],
        "PACKIT_BROKER_KEY_FILE": params["key_file"],
        "PACKIT_BROKER_CONNECT_TO": params["connect_to"],
        "PACKIT_MIGRATE_FROM": params["source_url"],
        "PACKIT_MIGRATE_TO": params["to"],
        "PACKIT_MIGRATE_TRANSPORT_OPTIONS": params["transport_options"],
    }
    merged = {**env, **{k: str(v) for k, v in overrides.items() if v}}
    source = fill("PACKIT_MIGRATE_FROM", merged["PACKIT_MIGRATE_FROM"])
    rollback = source.split("://")[0] in ("amqp", "amqps")
    destination = merged.get("PACKIT_MIGRATE_TO") or merged.get("PACKIT_BROKER_URL")
    if destination is None:
        raise DocProblem("no destination: set PACKIT_BROKER_URL (or --to)")
    to_redis = fill("PACKIT_MIGRATE_TO", destination).split("://")[0] in ("redis", "rediss")
    if rollback != to_redis:
        raise DocProblem("a rollback goes --from amqps://... --to redis://..., and only so")
    if not rollback:
        merged["PACKIT_BROKER_URL"] = destination
        merged.pop("PACKIT_MIGRATE_TO", None)
    validate_environment(merged)
    report = params["report_file"]
    if report is not None:
        folder = report.parent if report.is_absolute() else None
        if shell.writable is not None:
            if folder is None or not any(str(folder).startswith(w) for w in shell.writable):
                raise DocProblem(f"--report {report}: not on a writable volume of the pod")
        elif folder is not None and not folder.is_dir():
            raise DocProblem(f"--report {report}: folder {folder} does not exist")


def check_render(params: Mapping[str, Any], shell: Shell) -> None:
    template = params["template"]
    if params["list_only"] or template is None:
        return
    bad = [a for a in params["params"] if "=" not in a or a.startswith("=")]
    if bad:
        raise DocProblem(f"render: -p expects NAME=VALUE, got {bad[0]!r}")
    assignments = dict(a.partition("=")[::2] for a in params["params"])
    render_template(template, assignments, params["param_file"], shell)


def render_template(
    template: str, assignments: dict[str, str], param_file: str | None, shell: Shell
) -> None:
    """`render`/`oc process` of a bundled template; then its pods' commands and settings."""
    try:
        document = engine.load_template(template)
    except engine.RenderError as exc:
        raise DocProblem(str(exc)) from None
    if param_file is not None:
        if param_file in shell.files:
            text = shell.files[param_file]
        elif (REPO / param_file).is_file():
            text = (REPO / param_file).read_text()
        else:
            raise DocProblem(f"--param-file {param_file}: not written by the block, not in git")
        from_file = dict(
            line.partition("=")[::2]
            for line in text.splitlines()
            if line.strip() and not line.startswith("#")
        )
        assignments = {**from_file, **assignments}
    declared = {p["name"] for p in document.get("parameters", [])}
    given = {k: v for k, v in assignments.items() if k in declared}
    try:
        values = engine.resolve_parameters(document, given)
    except engine.RenderError as exc:
        if shell.inline and str(exc).startswith("required parameter"):
            return  # prose: `render worker` takes the -p parameters of the block above
        raise DocProblem(f"{template}: {exc}") from None
    unknown = sorted(set(assignments) - declared)
    if unknown:
        raise DocProblem(f"{template}: no parameter {', '.join(unknown)}")
    check_pods(engine.process(document, values), template, shell)


def check_pods(rendered: Mapping[str, Any], template: str, shell: Shell) -> None:
    """Every container's environment and, where it runs packit-broker or celery, its command."""
    secrets = {
        obj["metadata"]["name"]: {**obj.get("stringData", {}), **obj.get("data", {})}
        for obj in rendered["items"]
        if obj["kind"] == "Secret"
    }
    for obj in rendered["items"]:
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        if obj["kind"] == "CronJob":
            pod = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        if not pod:
            continue
        mounts_rw: dict[str, tuple[str, ...]] = {}
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            env: dict[str, str] = {}
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if "value" in entry:
                    env[entry["name"]] = str(entry["value"])
                elif ref and ref["name"] in secrets and ref["key"] in secrets[ref["name"]]:
                    env[entry["name"]] = str(secrets[ref["name"]][ref["key"]])
            where = f"{template}: container {container['name']}"
            try:
                validate_environment(env)
            except DocProblem as exc:
                raise DocProblem(f"{where}: {exc}") from None
            read_only = container.get("securityContext", {}).get("readOnlyRootFilesystem")
            mounts_rw[container["name"]] = tuple(
                m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")
            )
            inner = Shell(
                variables=env,
                writable=mounts_rw[container["name"]] if read_only else None,
                only_checked=True,
            )
            probes = [
                container.get(probe, {}).get("exec", {}).get("command")
                for probe in ("livenessProbe", "readinessProbe")
            ]
            for argv in [container.get("command", []) + container.get("args", []), *probes]:
                if not argv:
                    continue
                try:
                    if argv[0] in ("sh", "/bin/sh", "bash") and argv[1] == "-c":
                        run_script(argv[2], 1, inner)
                    else:
                        run_command(Command(list(argv), 1), inner)
                except DocProblem as exc:
                    raise DocProblem(f"{where}: {' '.join(argv)}: {exc}") from None
            shell.checked += inner.checked


# -- oc, ./dev, make, celery ------------------------------------------------------------------


def check_oc(args: list[str], shell: Shell) -> None:
    words = list(args)
    while words[:1] in (["-n"], ["--namespace"]):
        del words[:2]
    sub = next((a for a in words if not a.startswith("-")), None)
    if sub not in OC_SUBCOMMANDS:
        raise DocProblem(f"oc {sub}: not an oc subcommand this test knows")
    if sub != "process":
        return
    shell.checked += 1
    rest = args[args.index("process") + 1 :]
    files, assignments, param_file, list_only = [], {}, None, False
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        value = inline if eq else (rest[i + 1] if i + 1 < len(rest) else "")
        step = 1 if eq else 2
        if name in ("-f", "--filename"):
            files.append(value)
        elif name in ("-p", "--param"):
            key, _, val = value.partition("=")
            assignments[key] = val
        elif name == "--param-file":
            param_file = value
        elif name in ("-o", "--output", "-l", "--labels", "-n", "--namespace"):
            pass
        elif name in ("--parameters", "--local", "--raw", "--ignore-unknown-parameters"):
            list_only |= name == "--parameters"
            step = 1
        else:
            raise DocProblem(f"oc process: option {arg!r} is not one this test knows")
        i += step
    if len(files) != 1:
        raise DocProblem("oc process needs one -f TEMPLATE")
    path = files[0]
    bundled = engine.bundled_templates()
    if not (REPO / path).is_file() or Path(path).stem not in bundled:
        raise DocProblem(f"oc process -f {path}: not a bundled template ({', '.join(bundled)})")
    if not list_only:
        render_template(str(REPO / path), assignments, param_file, shell)


@functools.cache
def dev_targets() -> frozenset[str]:
    text = (REPO / "dev").read_text()
    return frozenset(t for m in re.findall(r"^\s+([a-z|]+)\)", text, re.M) for t in m.split("|"))


@functools.cache
def make_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


def check_dev(args: list[str], env: Mapping[str, str], shell: Shell) -> None:
    if not args or args[0] not in dev_targets():
        raise DocProblem(f"./dev {' '.join(args[:1])}: targets are {sorted(dev_targets())}")
    if args[0] == "demo":
        check_packit_broker(["demo", *args[1:]], env, shell)
    elif args[0] == "bench":
        source = (REPO / "bench" / "bench_migrate.py").read_text()
        for option in (a.split("=")[0] for a in args[1:] if a.startswith("--")):
            if f'"{option}"' not in source:
                raise DocProblem(f"./dev bench {option}: bench/bench_migrate.py has no such option")


def check_image_build(args: list[str]) -> None:
    """`podman build -f Containerfile --build-arg NAME=...`: the file, and an ARG it declares."""
    containerfile = "Containerfile"
    build_args: list[str] = []
    for flag, value in itertools.pairwise(args):
        if flag in ("-f", "--file"):
            containerfile = value
        elif flag == "--build-arg":
            build_args.append(value.partition("=")[0])
    path = REPO / containerfile
    if not path.is_file():
        raise DocProblem(f"build -f {containerfile}: no such file in the repository")
    declared = set(re.findall(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)", path.read_text(), re.M))
    for name in build_args:
        if name not in declared:
            raise DocProblem(f"--build-arg {name}: {containerfile} has no ARG {name}")


def check_make(args: list[str]) -> None:
    for target in (a for a in args if "=" not in a and not a.startswith("-")):
        if target not in make_targets():
            raise DocProblem(f"make {target}: no such target in the Makefile")


@functools.cache
def celery_options(subcommand: str) -> dict[str, bool]:
    """Options of `celery [SUB] --help` in this venv -> whether each takes a value."""
    if subcommand in CELERY_PLUGIN_OPTIONS:
        return CELERY_PLUGIN_OPTIONS[subcommand]
    celery = Path(sys.executable).with_name("celery")
    argv = [str(celery), *([subcommand] if subcommand else []), "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise DocProblem(f"celery {subcommand}: {result.stderr.strip().splitlines()[-1]}")
    options: dict[str, bool] = {}
    for line in result.stdout.splitlines():
        spec = re.match(r"^\s+(-[^ ].*?)(?:\s{2,}|$)", line)
        if not spec:
            continue
        names = re.findall(r"(?:^|[ ,/])(--?[A-Za-z][\w-]*)", spec.group(1))
        rest = re.sub(r"(?:^|[ ,/])--?[A-Za-z][\w-]*,?", "", spec.group(1)).strip(" /")
        for option in names:
            options[option] = bool(rest)
    return options


def check_celery(args: list[str]) -> None:
    """Global options, the subcommand, its options: all known to this venv's celery."""
    i, app, sub = 0, False, None
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            scope = sub or ""
            options = celery_options(scope)
            name = arg.split("=")[0]
            if name not in options and not (len(name) > 2 and name[:2] in options):
                raise DocProblem(f"celery {scope}: no option {name!r} (celery {scope} --help)")
            app |= name in ("-A", "--app") or name.startswith("-A")
            takes_value = options.get(name, False) and "=" not in arg
            i += 2 if takes_value else 1
        elif sub is None:
            sub = arg
            celery_options(sub)  # a subcommand this celery has (or a plugin we know)
            i += 1
        else:
            i += 1  # a positional argument (inspect's COMMAND)
    if sub in CELERY_NEEDS_APP and not app:
        raise DocProblem(
            f"celery {sub} without -A APP: it would not load celery_config() (no SNI, no"
            " database password; docs/usage.md)"
        )


# -- the tests -----------------------------------------------------------------------------------


def check_block(block: Block, shell: Shell) -> None:
    if not block.info:
        raise DocProblem(
            f"{block.where}: a fenced block without an info string: mark it sh or text"
        )
    if block.info not in SHELL_INFOS:
        return
    script = script_of(block)
    if not script:
        return
    text = "\n".join(line for _, line in script)
    # The tokenizer counts lines from the first; console blocks may skip output lines.
    numbers = [n for n, _ in script]
    try:
        run_script(text, 1, shell)
    except DocProblem as exc:
        message = str(exc)
        relative = re.match(r"line (\d+): (.*)", message, re.DOTALL)
        if relative:
            index = int(relative.group(1)) - 1
            line = numbers[min(index, len(numbers) - 1)]
            offending = script[min(index, len(script) - 1)][1].strip()
            raise DocProblem(
                f"{block.path.relative_to(REPO)}:{line}: {relative.group(2)}\n    {offending}"
            ) from None
        raise DocProblem(f"{block.where}: {message}") from None


#: Inline code in prose that is a whole command a reader may paste (a fragment such as
#: `render bridge` is not; `celery` spans are often the counter-examples the text warns about;
#: a synopsis with `[-p ...]` or a name with `(...)` is not a command either). Prose names a
#: command without the settings its context gives, so a missing required option is allowed.
INLINE_COMMAND = re.compile(
    r"^(?!.*\[-)(?!.* \()(?:[A-Z_]+=\S+ )*"
    r"(?:packit-broker |\.venv/bin/|python -m packit_broker|oc process |\./dev |make )"
)
REPO_PATH = re.compile(r"(?<![\w/.-])((?:scripts|bench|tests)/[\w./-]*\w)")


def inline_commands(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of inline code spans outside fenced blocks (a span may wrap a line)."""
    text = path.read_text()
    for block in fenced_blocks(path):  # blank out the blocks, keeping line numbers
        lines = text.split("\n")
        for i in range(block.line - 1, block.line + len(block.lines) + 1):
            if i < len(lines):
                lines[i] = ""
        text = "\n".join(lines)
    for match in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        yield text.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split())


def check_inline(path: Path, line: int, span: str, shell: Shell) -> bool:
    """Check one inline span; True if it was a command (or held a repository path)."""
    relative = path.relative_to(REPO)
    for mentioned in REPO_PATH.findall(span):
        if not (REPO / mentioned).exists():
            raise DocProblem(f"{relative}:{line}: {mentioned}: no such path\n    `{span}`")
    if not INLINE_COMMAND.match(span):
        return bool(REPO_PATH.search(span))
    # A command quoted in prose runs in the page's state, and changes nothing in it.
    scratch = Shell(dict(shell.variables), set(shell.functions), dict(shell.files), inline=True)
    try:
        run_script(span, 1, scratch)
    except DocProblem as exc:
        message = re.sub(r"^line \d+: ", "", str(exc))
        raise DocProblem(f"{relative}:{line}: {message}\n    `{span}`") from None
    shell.checked += scratch.checked
    return True


def test_every_shell_command_in_the_docs_works() -> None:
    problems: list[str] = []
    blocks = spans = 0
    commands = 0
    for path in DOCS:
        shell = Shell()  # a reader follows a page from the top: its exports carry on
        items: list[tuple[int, Block | str]] = [(b.line, b) for b in fenced_blocks(path)]
        items += list(inline_commands(path))
        for line, item in sorted(items, key=lambda pair: pair[0]):
            try:
                if isinstance(item, Block):
                    blocks += item.info in SHELL_INFOS
                    check_block(item, shell)
                else:
                    spans += check_inline(path, line, item, shell)
            except DocProblem as exc:
                problems.append(str(exc))
        commands += shell.checked
    print(
        f"\ndocs: {blocks} shell blocks and {spans} inline commands checked in {len(DOCS)} files;"
        f" {commands} packit-broker, oc process and celery commands checked in depth"
    )
    assert blocks > 0
    assert not problems, "commands in the docs that do not work:\n" + "\n".join(problems)


# -- the checker itself: it catches what the SRE met -------------------------------------------


def problem_of(text: str, info: str = "sh") -> str:
    block = Block(REPO / "docs" / "x.md", 1, info, tuple(text.strip("\n").splitlines()))
    with pytest.raises(DocProblem) as caught:
        check_block(block, Shell())
    return str(caught.value)


def passes(text: str, info: str = "sh") -> None:
    check_block(
        Block(REPO / "docs" / "x.md", 1, info, tuple(text.strip("\n").splitlines())), Shell()
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("packit-broker chek", "no command 'chek'"),
        ("packit-broker migrate --dryrun", "No such option"),
        ("packit-broker check --timeout 0.1", "0.1"),
        ("PACKIT_BROKER_URL=amqps://u:p@h.example.com:443/ packit-broker check --jsn", "--jsn"),
        (
            "export PACKIT_BROKER_URL='amqps://packit:PASSWORD@rabbitmq.apps.example.com:443/'\n"
            "export PACKIT_RESULT_BACKEND_URL='db+postgresql://...'\npackit-broker check",
            "PACKIT_RESULT_BACKEND_URL",
        ),
        (
            "PACKIT_BROKER_QUEUE_TYPE=quorum PACKIT_BROKER_MAX_PRIORITY=10 celery -A app beat",
            "quorum queues do not take x-max-priority",
        ),
        ("PACKIT_BROKER_MAX_PRIORITY=0", "PACKIT_BROKER_MAX_PRIORITY"),
        (
            "PACKIT_BROKER_URL=amqps://... PACKIT_MIGRATE_FROM=redis://... packit-broker migrate"
            " --follow --report /data/report.json",
            "folder /data does not exist",
        ),
        ("PACKIT_MIGRATE_FROM=redis://... packit-broker migrate --metrics-port 9", "--follow"),
        ("export PACKIT_MIGRATE_FROM=http://...", "PACKIT_MIGRATE_FROM"),
        ("packit-broker render rabbitmq -p ROUTE_HOST=a.example.com -p NOPE=1", "NOPE"),
        ("packit-broker render rabbitmq", "ROUTE_HOST"),
        ("packit-broker render nope", "nope"),
        (
            "oc process -f manifests/worker.yaml -p IMAGE=i -p CA_CERT=c"
            " -p BROKER_URL=amqps://... -p RESULT_BACKEND_URL='db+postgresql://...'",
            "PACKIT_RESULT_BACKEND_URL",
        ),
        ("oc process -f manifests/worker.yaml -p IMAGE=i -p CA_CERT=c", "BROKER_URL"),
        ("oc process -f manifests/nope.yaml", "not a bundled template"),
        ("oc frobnicate", "not an oc subcommand"),
        (
            "oc process -f manifests/worker.yaml -p IMAGE=i -p CA_CERT=c -p BROKER_URL=amqps://..."
            " -p COMMAND='celery -A app worker --prefetch=1'",
            "no option '--prefetch'",
        ),
        ("./dev tests", "targets are"),
        ("./dev demo --kep", "--kep"),
        ("./dev bench --millions", "--millions"),
        ("make tset", "tset"),
        ("podman build -f Containerfile --build-arg BASEIMAGE=x -t i .", "no ARG BASEIMAGE"),
        ("~/venv/bin/packit-broker rendr", "no command 'rendr'"),
        ("bash scripts/nope.sh", "scripts/nope.sh"),
        ("celery -A app worker --pool=gevent --prefetch-multiplyer=1", "--prefetch-multiplyer"),
        ("celery worker -Q short-running", "without -A"),
        ("celery -A app wrker", "wrker"),
        ("Plan (nothing has been changed):", "unknown command"),
        ("$ packit-broker check", "prompt"),
        ("printf x > f && packit-broker render bridge --param-file f", "printf"),
        ("packit-broker render bridge --param-file missing.params", "missing.params"),
    ],
)
def test_the_checker_finds_broken_commands(text: str, expected: str) -> None:
    assert expected in problem_of(text)


def test_the_checker_reports_file_line_and_command() -> None:
    text = "umask 077\n\npackit-broker migrate \\\n  --dry-run --nope\n"
    message = problem_of(text)
    assert message.startswith("docs/x.md:4: ")
    assert "packit-broker migrate \\" in message or "--dry-run --nope" in message


def test_console_blocks_check_only_prompt_lines() -> None:
    passes(
        "$ packit-broker check --json\n[{...output...}]\n$ packit-broker check \\\n  --timeout 5",
        info="console",
    )
    assert "console block without" in problem_of("healthy (0 warning(s)).", info="console")
    assert "--nope" in problem_of("$ packit-broker check --nope\noutput", info="console")


def test_an_unmarked_block_fails() -> None:
    assert "info string" in problem_of("LOST the connection", info="")


@pytest.mark.parametrize(
    "text",
    [
        # placeholders filled, not skipped
        "export PACKIT_BROKER_URL='amqps://USER:PASSWORD@ROUTE_HOST:443/VHOST'\n"
        "export PACKIT_BROKER_QUEUES=...\nexport PACKIT_MIGRATE_TRANSPORT_OPTIONS='{...}'\n"
        "PACKIT_MIGRATE_FROM=redis://... packit-broker migrate --follow --report /tmp/r.json",
        "set -a; . ./packit.env; set +a   # the reader's\npackit-broker migrate --dry-run",
        'secret() { oc get secret "$1" -o jsonpath="{.data.$2}" | base64 -d; }\n'
        "packit-broker render rabbitmq -p ROUTE_HOST=a.example.com \\\n"
        '  -p PASSWORD="$(secret rabbitmq-credentials password)" -p ERLANG_COOKIE=…'
        " | oc apply -f -",
        "umask 077\nprintf '%s\\n' 'IMAGE=i' 'REDIS_URL=redis://:P@redis:6379/0' > b.params\n"
        "packit-broker render bridge --param-file b.params | oc apply -f -",
        "for pod in $(oc get pods -o name); do\n"
        "  oc exec \"$pod\" -- rabbitmqctl eval 'x().'\ndone",
        "celery --app=APP worker --concurrency=16 --pool=gevent --prefetch-multiplier=1 -Q a,b",
        "./dev demo --keep\n. .venv/bin/activate\nmake test PYTEST_ARGS=-x",
        "python3 -m venv ~/v\n~/v/bin/pip install ./dist/x.whl\n~/v/bin/packit-broker --version",
        "podman build -f Containerfile --build-arg BASE=b -t i . && podman push i",
    ],
)
def test_the_checker_accepts_working_commands(text: str) -> None:
    passes(text)


# -- parameter tables in docs/deploy.md: exactly the template's parameters ---------------------

TABLES = {"## 2. RabbitMQ": "rabbitmq", "## 3. Workers": "worker", "## The bridge": "bridge"}


def parameter_tables() -> dict[str, dict[str, str]]:
    """Template -> {NAME: its Default cell} from the first `| Parameter |` table of a section."""
    found: dict[str, dict[str, str]] = {}
    section = None
    fenced = False
    for line in (REPO / "docs" / "deploy.md").read_text().splitlines():
        fenced ^= line.lstrip().startswith("```")
        if fenced:
            continue
        if line.startswith("#"):
            section = next((t for h, t in TABLES.items() if line.startswith(h)), None)
            continue
        if section is None or not line.startswith("| `"):
            continue
        names_cell, default_cell = (c.strip() for c in line.strip("|").split("|")[:2])
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", names_cell)
        defaults = default_cell.split(" / ") if " / " in names_cell else [default_cell]
        for i, name in enumerate(names):
            found.setdefault(section, {})[name] = defaults[min(i, len(defaults) - 1)]
    return found


@pytest.mark.parametrize("template", sorted(set(TABLES.values())))
def test_deploy_md_parameter_table_is_the_templates(template: str) -> None:
    table = parameter_tables().get(template, {})
    declared = {p["name"]: p for p in engine.load_template(template)["parameters"]}
    assert sorted(table) == sorted(declared), "docs/deploy.md's table vs the template"
    for name, cell in table.items():
        param = declared[name]
        value = "" if param.get("value") is None else str(param["value"])
        if param.get("generate"):
            assert cell.startswith("generated"), (name, cell)
        elif value:
            shown = re.match(r"`([^`]*)`", cell)
            assert shown and shown.group(1) == value, (name, cell, value)
        elif param.get("required"):
            assert cell == "*required*", (name, cell)
        else:
            assert cell.startswith("empty"), (name, cell)


def test_the_yaml_of_the_docs_parses() -> None:
    """A `yaml` block (cert-manager's Certificate) that does not parse does not apply either."""
    for path in DOCS:
        for block in fenced_blocks(path):
            if block.info == "yaml":
                yaml.safe_load("\n".join(block.lines))
