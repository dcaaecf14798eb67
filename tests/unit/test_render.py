"""``oc process`` semantics of packit_broker.render and the ``render`` click command."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from packit_broker import render as engine
from packit_broker.commands.render import render


def template(*objects: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A minimal Template; parameters and labels come from *extra*."""
    return {
        "apiVersion": "template.openshift.io/v1",
        "kind": "Template",
        "metadata": {"name": "t"},
        "objects": list(objects),
        **extra,
    }


def config_map(data: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", **metadata},
        "data": data,
    }


def only_item(rendered: dict[str, Any]) -> dict[str, Any]:
    assert rendered["kind"] == "List"
    assert rendered["apiVersion"] == "v1"
    (item,) = rendered["items"]
    return dict(item)


# --- substitution -------------------------------------------------------------------------


def test_string_reference_substituted_anywhere_in_a_string() -> None:
    tpl = template(
        config_map({"url": "amqps://${HOST}:${PORT}/"}),
        parameters=[{"name": "HOST", "value": "h"}, {"name": "PORT", "value": "443"}],
    )
    assert only_item(engine.process(tpl, {}))["data"]["url"] == "amqps://h:443/"


def test_non_string_reference_yields_json_value() -> None:
    tpl = template(
        {"kind": "X", "spec": {"replicas": "${{N}}", "flag": "${{F}}", "text": "${{T}}"}},
        parameters=[{"name": "N"}, {"name": "F", "value": "true"}, {"name": "T", "value": "a b"}],
    )
    spec = only_item(engine.process(tpl, {"N": "3"}))["spec"]
    assert spec["replicas"] == 3
    assert spec["flag"] is True
    assert spec["text"] == "a b"  # not JSON: kept as a string, as oc does


def test_non_string_reference_only_as_whole_value() -> None:
    tpl = template({"kind": "X", "v": "x${{N}}"}, parameters=[{"name": "N", "value": "3"}])
    assert only_item(engine.process(tpl, {}))["v"] == "x${{N}}"


def test_unknown_reference_left_untouched() -> None:
    tpl = template(
        {"kind": "X", "v": "${UNDECLARED}-${A}", "w": "${{UNDECLARED}}", "sh": "$HOME $(POD)"},
        parameters=[{"name": "A", "value": "a"}],
    )
    item = only_item(engine.process(tpl, {}))
    assert item["v"] == "${UNDECLARED}-a"
    assert item["w"] == "${{UNDECLARED}}"
    assert item["sh"] == "$HOME $(POD)"


def test_map_keys_substituted_like_oc() -> None:
    tpl = template({"kind": "X", "data": {"${K}": "v"}}, parameters=[{"name": "K", "value": "key"}])
    assert only_item(engine.process(tpl, {}))["data"] == {"key": "v"}


def test_non_string_leaves_untouched() -> None:
    tpl = template({"kind": "X", "n": 1, "b": False, "z": None}, parameters=[])
    assert only_item(engine.process(tpl, {})) == {"kind": "X", "n": 1, "b": False, "z": None}


def test_input_not_mutated_and_output_deterministic() -> None:
    tpl = template(
        config_map({"a": "${A}"}, namespace="fixed"),
        parameters=[{"name": "A", "value": "1"}],
        labels={"l": "${A}"},
    )
    before = json.dumps(tpl, sort_keys=True)
    first = engine.process(tpl, {})
    assert json.dumps(tpl, sort_keys=True) == before
    assert engine.process(tpl, {}) == first


def test_hard_coded_namespace_dropped_parameterised_kept() -> None:
    tpl = template(
        config_map({}, namespace="fixed"),
        {"kind": "X", "metadata": {"name": "y", "namespace": "${NS}"}},
        parameters=[{"name": "NS", "value": "mine"}],
    )
    first, second = engine.process(tpl, {})["items"]
    assert "namespace" not in first["metadata"]
    assert second["metadata"]["namespace"] == "mine"


# --- parameters ---------------------------------------------------------------------------


def test_missing_required_names_every_parameter() -> None:
    tpl = template(
        parameters=[
            {"name": "ROUTE_HOST", "required": True},
            {"name": "OTHER", "required": True},
            {"name": "FINE", "required": True, "value": "x"},
        ]
    )
    with pytest.raises(engine.RenderError, match="ROUTE_HOST, OTHER") as info:
        engine.process(tpl, {})
    assert "FINE" not in str(info.value)


def test_required_given_empty_is_still_missing() -> None:
    tpl = template(parameters=[{"name": "R", "required": True, "value": "default"}])
    with pytest.raises(engine.RenderError, match="R"):
        engine.process(tpl, {"R": ""})


def test_unknown_parameter_rejected() -> None:
    tpl = template(parameters=[{"name": "A"}])
    with pytest.raises(engine.RenderError, match=r"unknown parameter.*NOPE"):
        engine.process(tpl, {"NOPE": "1"})


def test_given_value_wins_over_default_and_generation() -> None:
    tpl = template(
        config_map({"a": "${A}", "p": "${P}"}),
        parameters=[
            {"name": "A", "value": "default"},
            {"name": "P", "generate": "expression", "from": "[a-z]{8}"},
        ],
    )
    data = only_item(engine.process(tpl, {"A": "given", "P": "x"}))["data"]
    assert data == {"a": "given", "p": "x"}


def test_template_value_wins_over_generation() -> None:
    tpl = template(
        config_map({"p": "${P}"}),
        parameters=[{"name": "P", "value": "fixed", "generate": "expression", "from": "[a-z]{8}"}],
    )
    assert only_item(engine.process(tpl, {}))["data"]["p"] == "fixed"


def test_generated_password_differs_between_renders_unless_given() -> None:
    tpl = engine.load_template("rabbitmq")
    params = {"ROUTE_HOST": "amqp.example.com"}

    def password(rendered: dict[str, Any]) -> str:
        (secret,) = [
            s for s in engine.find_objects(rendered, "Secret") if "password" in s["stringData"]
        ]
        return str(secret["stringData"]["password"])

    first, second = password(engine.process(tpl, params)), password(engine.process(tpl, params))
    assert first != second
    assert re.fullmatch(r"[a-zA-Z0-9]{32}", first)
    given_value = "verbatim ${NAME} $x"
    assert password(engine.process(tpl, {**params, "PASSWORD": given_value})) == given_value


def test_seeded_rng_makes_generation_reproducible() -> None:
    tpl = template(
        config_map({"p": "${P}"}),
        parameters=[{"name": "P", "generate": "expression", "from": "[\\w]{16}"}],
    )
    first = engine.process(tpl, {}, rng=random.Random(7))
    assert engine.process(tpl, {}, rng=random.Random(7)) == first


def test_unknown_generator_rejected() -> None:
    tpl = template(parameters=[{"name": "P", "generate": "uuid"}])
    with pytest.raises(engine.RenderError, match="generator"):
        engine.process(tpl, {})


# --- labels -------------------------------------------------------------------------------


def test_template_labels_added_and_overwrite_like_oc() -> None:
    tpl = template(
        config_map({}, labels={"own": "1", "shared": "object"}),
        {"kind": "X", "metadata": {"name": "no-labels"}},
        parameters=[{"name": "N", "value": "v"}],
        labels={"shared": "template", "from-param": "${N}"},
    )
    first, second = engine.process(tpl, {})["items"]
    assert first["metadata"]["labels"] == {"own": "1", "shared": "template", "from-param": "v"}
    assert second["metadata"]["labels"] == {"shared": "template", "from-param": "v"}


def test_process_message_substitutes() -> None:
    tpl = template(message="go to ${HOST}", parameters=[{"name": "HOST", "value": "h"}])
    values = engine.resolve_parameters(tpl, {})
    assert engine.process_message(tpl, values) == "go to h"


# --- expression generator -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "pattern"),
    [
        ("[a-zA-Z0-9]{32}", r"[a-zA-Z0-9]{32}"),
        ("test[0-9]{1}x", r"test[0-9]x"),
        ("0x[A-F0-9]{4}", r"0x[A-F0-9]{4}"),
        ("[\\w]{10}", r"[a-zA-Z0-9_]{10}"),
        ("[\\d]{10}", r"[0-9]{10}"),
        ("[\\a]{10}", r"[a-zA-Z]{10}"),
        ("[\\A]{10}", r"[~!@#$%^&*()\-_+={}\[\]\\|<,>.?/\"';:`]{10}"),
        ("[abc]{5}-[x-z]{2}", r"[abc]{5}-[x-z]{2}"),
        ("no generator [a-z]", r"no generator \[a-z\]"),
    ],
)
def test_expression_examples(expression: str, pattern: str) -> None:
    rng = random.Random(1)
    for _ in range(20):
        assert re.fullmatch(pattern, engine.generate_expression(expression, rng))


@pytest.mark.parametrize("expression", ["[a-z]{0}", "[a-z]{256}", "[z-a]{3}", "[a-]{3}"])
def test_bad_expressions_rejected(expression: str) -> None:
    with pytest.raises(engine.RenderError):
        engine.generate_expression(expression, random.Random(0))


_RANGES = st.sampled_from(["a-z", "A-Z", "0-9", "a-f", "A-F", "\\w", "\\d", "\\a", "xyz", "k"])
_REGEX_OF = {"\\w": "a-zA-Z0-9_", "\\d": "0-9", "\\a": "a-zA-Z"}
_LITERAL = st.text(alphabet="abcXYZ019-_.:/", max_size=4)


@st.composite
def expressions(draw: st.DrawFn) -> tuple[str, str]:
    """A generator expression and the regular expression its values must match."""
    source, regex = "", ""
    for _ in range(draw(st.integers(1, 3))):
        literal = draw(_LITERAL)
        ranges = draw(st.lists(_RANGES, min_size=1, max_size=3))
        count = draw(st.integers(1, 255))
        source += f"{literal}[{''.join(ranges)}]{{{count}}}"
        regex += re.escape(literal) + "[" + "".join(_REGEX_OF.get(r, r) for r in ranges) + "]"
        regex += f"{{{count}}}"
    return source, regex


@given(expressions(), st.integers(0, 2**32))
def test_generated_values_match_their_pattern(case: tuple[str, str], seed: int) -> None:
    expression, regex = case
    value = engine.generate_expression(expression, random.Random(seed))
    assert re.fullmatch(regex, value), (expression, value)


@given(st.sampled_from(["[a-zA-Z0-9]{32}", "[\\w]{20}", "pw-[\\d]{6}"]))
def test_parameter_generation_uses_from_pattern(expression: str) -> None:
    tpl = template(
        config_map({"p": "${P}"}),
        parameters=[{"name": "P", "generate": "expression", "from": expression}],
    )
    value = only_item(engine.process(tpl, {}))["data"]["p"]
    regex = expression.replace("\\w", "a-zA-Z0-9_").replace("\\d", "0-9")
    assert re.fullmatch(regex, value)


# --- loading and parameter files ----------------------------------------------------------


def test_bundled_templates_and_load_by_name() -> None:
    names = engine.bundled_templates()
    assert {"rabbitmq", "postgresql-route", "worker"} <= set(names)
    assert engine.load_template("rabbitmq")["kind"] == "Template"


def test_load_by_path(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(template()))
    assert engine.load_template(str(path))["metadata"]["name"] == "t"


def test_load_missing_and_non_template(tmp_path: Path) -> None:
    with pytest.raises(engine.RenderError, match="neither a bundled template"):
        engine.load_template("no-such-template")
    path = tmp_path / "cm.yaml"
    path.write_text(yaml.safe_dump(config_map({})))
    with pytest.raises(engine.RenderError, match="not an OpenShift Template"):
        engine.load_template(str(path))


def test_read_param_file(tmp_path: Path) -> None:
    path = tmp_path / "params.env"
    path.write_text("# comment\n\nA=1\nB = x=y \n  # indented comment\nC=\n")
    assert engine.read_param_file(path) == {"A": "1", "B": " x=y ", "C": ""}


def test_read_param_file_bad_line_has_line_number(tmp_path: Path) -> None:
    path = tmp_path / "params.env"
    path.write_text("A=1\nnot an assignment\n")
    with pytest.raises(engine.RenderError, match=r"params.env:2"):
        engine.read_param_file(path)


def test_find_objects() -> None:
    rendered = {"items": [{"kind": "A", "n": 1}, {"kind": "B"}, {"kind": "A", "n": 2}]}
    assert [o["n"] for o in engine.find_objects(rendered, "A")] == [1, 2]
    assert engine.find_objects(rendered, "C") == []


# --- the click command --------------------------------------------------------------------

ROUTE = ["-p", "ROUTE_HOST=amqp.example.com"]


def invoke(*args: str) -> Any:
    # Separate stdout and stderr on every supported click: before 8.2 CliRunner mixes them
    # unless told not to; 8.2 always keeps them apart and no longer takes `mix_stderr`.
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        runner = CliRunner()
    return runner.invoke(render, list(args))


@pytest.mark.parametrize(("flag", "loader"), [("yaml", yaml.safe_load), ("json", json.loads)])
def test_cli_outputs_parse(flag: str, loader: Any) -> None:
    result = invoke("rabbitmq", *ROUTE, "-o", flag)
    assert result.exit_code == 0, result.output
    # The template message goes to stderr; stdout holds only the List.
    document = loader(result.stdout)
    assert document["kind"] == "List"
    (route,) = engine.find_objects(document, "Route")
    assert route["spec"]["host"] == "amqp.example.com"
    assert "amqp.example.com" in result.stderr


def test_cli_yaml_keeps_multiline_strings_readable() -> None:
    result = invoke("rabbitmq", *ROUTE)
    assert "rabbitmq.conf: |" in result.stdout


def test_cli_param_file_and_p_precedence(tmp_path: Path) -> None:
    path = tmp_path / "p.env"
    path.write_text("ROUTE_HOST=from-file.example.com\nNAME=broker\n")
    result = invoke("rabbitmq", "--param-file", str(path), "-p", "NAME=cli", "-o", "json")
    assert result.exit_code == 0, result.output
    (route,) = engine.find_objects(json.loads(result.stdout), "Route")
    assert route["spec"]["host"] == "from-file.example.com"
    assert route["metadata"]["name"] == "cli"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rabbitmq"], "ROUTE_HOST"),
        (["rabbitmq", *ROUTE, "-p", "NOPE=1"], "NOPE"),
        (["rabbitmq", "-p", "ROUTE_HOST"], "NAME=VALUE"),
        (["no-such-template"], "neither a bundled template"),
        ([], "TEMPLATE"),
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_cli_list() -> None:
    result = invoke("--list")
    assert result.exit_code == 0
    assert {line.split("\t")[0] for line in result.stdout.splitlines()} >= {"rabbitmq", "worker"}


# --- render --parameters: `oc process --parameters` without a checkout -----------------------


def test_cli_parameters_table_lists_every_parameter_with_its_default() -> None:
    result = invoke("--parameters", "rabbitmq")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "REQUIRED", "DEFAULT", "DESCRIPTION"]
    declared = engine.load_template("rabbitmq")["parameters"]
    assert [row.split()[0] for row in rows] == [p["name"] for p in declared]
    by_name = {row.split()[0]: row.split(maxsplit=3) for row in rows}
    assert by_name["NAME"][1:3] == ["yes", "rabbitmq"]
    assert by_name["ROUTE_HOST"][1:3] == ["yes", "(required)"]
    assert by_name["ALLOWED_CIDRS"][1:3] == ["no", "(empty)"]
    assert by_name["PASSWORD"][2] == "(generated:"
    assert "[a-zA-Z0-9]{32})" in by_name["PASSWORD"][3]
    # A multi-line YAML description is one line of the table.
    assert "keep it at about 40%" in by_name["MEMORY_HIGH_WATERMARK"][3].lower()


def test_cli_parameters_long_default_does_not_shift_other_rows() -> None:
    result = invoke("--parameters", "worker")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    command = next(line for line in lines if line.startswith("COMMAND "))
    assert "celery -A packit_worker worker" in command  # shown whole, not cut
    short = [line for line in lines if line.split()[0] in ("NAME", "IMAGE", "QUEUES")]
    starts = {line.index(line.split(maxsplit=3)[3]) for line in short}
    assert len(starts) == 1, short  # the descriptions of ordinary rows stay in one column


@pytest.mark.parametrize(("flag", "loader"), [("yaml", yaml.safe_load), ("json", json.loads)])
def test_cli_parameters_as_data(flag: str, loader: Any) -> None:
    result = invoke("--parameters", "bridge", "-o", flag)
    assert result.exit_code == 0, result.output
    rows = loader(result.stdout)
    (redis_url,) = [row for row in rows if row["name"] == "REDIS_URL"]
    assert redis_url["required"] is True
    assert redis_url["value"] == ""
    assert "PACKIT_MIGRATE_FROM" in redis_url["description"]


def test_cli_parameters_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    tpl = template(config_map({}), parameters=[{"name": "X", "value": 3, "description": "d"}])
    path.write_text(yaml.safe_dump(tpl))
    result = invoke("--parameters", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[1].split() == ["X", "no", "3", "d"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parameters"], "TEMPLATE"),
        (["--parameters", "no-such-template"], "neither a bundled template"),
        (["--parameters", "rabbitmq", *ROUTE], "takes no -p"),
    ],
)
def test_cli_parameters_usage_errors(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.stderr
