"""Process OpenShift Templates the way ``oc process`` does, without a cluster.

The bundled manifests are ``template.openshift.io/v1`` Templates so that users on OpenShift can
run ``oc process -f ... | oc apply -f -``. This module gives the same result offline (for
``packit-broker render``, for the unit tests and for the integration test that configures its
router from the rendered Route). It follows openshift/library-go ``templateprocessing``:

* ``${X}`` is replaced inside any string, map keys included; several per string are allowed.
* ``${{X}}`` as the *whole* string becomes the value decoded as JSON (``"3"`` -> ``3``); a value
  that is not valid JSON stays a string, as the OpenShift docs describe.
* References to names that are not declared parameters are left untouched.
* A value given by the caller wins; otherwise the parameter's ``value``; otherwise, with
  ``generate: expression``, a value generated from ``from``. ``required`` parameters that end up
  empty are an error, and so are caller parameters the template does not declare.
* The template's ``labels`` are set on every object's ``metadata.labels``, overwriting a label
  of the same key (``addObjectLabels`` in library-go).
* A hard-coded ``metadata.namespace`` is dropped unless it contains a ``${...}`` reference.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "RenderError",
    "bundled_templates",
    "find_objects",
    "generate_expression",
    "load_template",
    "process",
    "read_param_file",
    "resolve_parameters",
]

TEMPLATE_API_VERSIONS = frozenset({"template.openshift.io/v1", "v1"})

_STRING_REF = re.compile(r"\$\{([a-zA-Z0-9_]+?)\}")
_NON_STRING_REF = re.compile(r"^\$\{\{([a-zA-Z0-9_]+)\}\}$")

# The character classes of library-go's expression generator, as documented for OpenShift 4.
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NUMERALS = "0123456789"
_SYMBOLS = "~!@#$%^&*()-_+={}[]\\|<,>.?/\"';:`"
_ASCII = _ALPHABET + _NUMERALS + _SYMBOLS
_CLASSES = {
    r"\w": _ALPHABET + _NUMERALS + "_",
    r"\d": _NUMERALS,
    r"\a": _ALPHABET,
    r"\A": _SYMBOLS,
}
_GENERATOR = re.compile(r"\[([a-zA-Z0-9\-\\]+)\]\{([0-9]+)\}")
_RANGE_ITEM = re.compile(r"\\[wdaA]|[a-zA-Z0-9]-[a-zA-Z0-9]|[a-zA-Z0-9]")
_MAX_GENERATED = 255


class RenderError(Exception):
    """A template cannot be loaded or processed; the message says what to fix."""


def bundled_templates() -> dict[str, Path]:
    """Map each bundled template's short name (``rabbitmq``) to its file."""
    folder = resources.files("packit_broker").joinpath("manifests")
    found: dict[str, Path] = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".yaml"):
            found[entry.name.removesuffix(".yaml")] = Path(str(entry))
    return dict(sorted(found.items()))


def load_template(name_or_path: str) -> dict[str, Any]:
    """Load a bundled template by short name, or a Template from a file path."""
    bundled = bundled_templates()
    if name_or_path in bundled:
        path = bundled[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            names = ", ".join(bundled) or "none"
            raise RenderError(
                f"{name_or_path!r} is neither a bundled template ({names}) nor a readable file"
            )
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RenderError(f"cannot read template {str(path)!r}: {exc}") from exc
    _check_template(document, str(path))
    return dict(document)


def _check_template(document: object, origin: str) -> None:
    """Reject anything that is not a Template early, with the reason."""
    if not isinstance(document, dict) or document.get("kind") != "Template":
        raise RenderError(f"{origin!r} is not an OpenShift Template (kind: Template)")
    if document.get("apiVersion") not in TEMPLATE_API_VERSIONS:
        raise RenderError(f"{origin!r}: unsupported apiVersion {document.get('apiVersion')!r}")
    if not isinstance(document.get("objects", []), list):
        raise RenderError(f"{origin!r}: 'objects' must be a list")
    for param in document.get("parameters", []) or []:
        if not isinstance(param, dict) or not isinstance(param.get("name"), str):
            raise RenderError(f"{origin!r}: every parameter needs a 'name'")


def read_param_file(path: str | Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines (``#`` comments and blank lines ignored), as ``--param-file``.

    Like oc, the value is everything after the first ``=``, kept verbatim (no quote removal).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RenderError(f"cannot read parameter file {str(path)!r}: {exc}") from exc
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[a-zA-Z0-9_]+", name):
            raise RenderError(f"{path}:{number}: expected NAME=VALUE, got {line!r}")
        values[name] = value
    return values


def generate_expression(expression: str, rng: random.Random) -> str:
    """Expand every ``[ranges]{N}`` in *expression*; other characters are kept literally."""
    parts: list[str] = []
    position = 0
    for match in _GENERATOR.finditer(expression):
        parts.append(expression[position : match.start()])
        alphabet = _alphabet(match.group(1), expression)
        length = int(match.group(2))
        if not 1 <= length <= _MAX_GENERATED:
            raise RenderError(
                f"expression {expression!r}: length must be within [1-{_MAX_GENERATED}]"
            )
        parts.append("".join(rng.choice(alphabet) for _ in range(length)))
        position = match.end()
    parts.append(expression[position:])
    return "".join(parts)


def _alphabet(ranges: str, expression: str) -> str:
    """Turn the inside of ``[...]`` into the characters it allows."""
    items = _RANGE_ITEM.findall(ranges)
    if "".join(items) != ranges:
        raise RenderError(f"malformed expression syntax in {expression!r}: [{ranges}]")
    chars: list[str] = []
    for item in items:
        if item in _CLASSES:
            chars.append(_CLASSES[item])
        elif len(item) == 3:
            start, end = _ASCII.index(item[0]), _ASCII.index(item[2])
            if start > end:
                raise RenderError(f"invalid range {item!r} in expression {expression!r}")
            chars.append(_ASCII[start : end + 1])
        else:
            chars.append(item)
    return "".join(dict.fromkeys("".join(chars)))


def resolve_parameters(
    template: Mapping[str, Any],
    params: Mapping[str, str],
    *,
    rng: random.Random | None = None,
) -> dict[str, str]:
    """Return the final value of every declared parameter (given, default or generated)."""
    declared = list(template.get("parameters", []) or [])
    names = {str(p["name"]) for p in declared}
    unknown = sorted(set(params) - names)
    if unknown:
        raise RenderError(f"unknown parameter name(s) for this template: {', '.join(unknown)}")
    rng = rng if rng is not None else random.SystemRandom()
    values: dict[str, str] = {}
    missing: list[str] = []
    for param in declared:
        name = str(param["name"])
        value = params[name] if name in params else _stringify(param.get("value"))
        if not value and param.get("generate"):
            value = _generate(param, rng)
        if not value and param.get("required"):
            missing.append(name)
        values[name] = value
    if missing:
        raise RenderError(
            f"required parameter(s) without a value: {', '.join(missing)} (pass -p NAME=VALUE)"
        )
    return values


def _stringify(value: object) -> str:
    """Parameter values are strings in the API; YAML may have parsed ``1`` as an int."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _generate(param: Mapping[str, Any], rng: random.Random) -> str:
    if param.get("generate") != "expression":
        raise RenderError(f"parameter {param['name']}: unknown generator {param.get('generate')!r}")
    return generate_expression(str(param.get("from", "")), rng)


def process(
    template: Mapping[str, Any],
    params: Mapping[str, str],
    *,
    rng: random.Random | None = None,
) -> dict[str, Any]:
    """Render *template* with *params* into a ``v1`` List, like ``oc process``.

    Generated values use :class:`random.SystemRandom` unless *rng* is given (tests pass a
    seeded one). The input is not modified.
    """
    values = resolve_parameters(template, params, rng=rng)
    labels = {
        _substitute_string(str(k), values): _substitute_string(str(v), values)
        for k, v in (template.get("labels") or {}).items()
    }
    items = []
    for obj in template.get("objects", []) or []:
        item = copy.deepcopy(obj)
        _strip_namespace(item)
        item = _substitute(item, values)
        _add_labels(item, labels)
        items.append(item)
    return {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}


def process_message(template: Mapping[str, Any], values: Mapping[str, str]) -> str:
    """The template's ``message`` with parameters substituted (oc shows it after creation)."""
    return _substitute_string(str(template.get("message", "") or ""), values)


def _strip_namespace(obj: object) -> None:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(metadata, dict) and "namespace" in metadata:
        namespace = metadata["namespace"]
        if not (isinstance(namespace, str) and _STRING_REF.search(namespace)):
            del metadata["namespace"]


def _substitute(node: Any, values: Mapping[str, str]) -> Any:
    """Return a copy of *node* with every string (and map key) substituted."""
    if isinstance(node, dict):
        return {
            _substitute_string(str(k), values) if isinstance(k, str) else k: _substitute(v, values)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, str):
        return _substitute_value(node, values)
    return node


def _substitute_value(text: str, values: Mapping[str, str]) -> Any:
    whole = _NON_STRING_REF.match(text)
    if whole and whole.group(1) in values:
        raw = values[whole.group(1)]
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return _substitute_string(text, values)


def _substitute_string(text: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    return _STRING_REF.sub(replace, text)


def _add_labels(obj: object, labels: Mapping[str, str]) -> None:
    if not labels or not isinstance(obj, dict):
        return
    metadata = obj.setdefault("metadata", {})
    if isinstance(metadata, dict):
        existing = metadata.get("labels") or {}
        metadata["labels"] = {**existing, **labels}


def find_objects(rendered: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """All items of *kind* in a rendered List, in template order."""
    return [item for item in rendered.get("items", []) if item.get("kind") == kind]
