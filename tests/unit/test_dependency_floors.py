"""The declared dependency floors are the versions `tox -e lowest` installs and tests.

A floor that nothing installs is a guess: py-amqp 5.3 was allowed once, and every TLS
connection failed on it. `constraints/lowest.txt` pins each runtime dependency to its floor
and the `lowest` tox env runs the tests against exactly those pins; these tests keep the
two lists from drifting apart, and check the one floor a wrong version breaks silently
until the first connection (py-amqp's ssl dict).
"""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from packit_broker.config import TLSSettings
from packit_broker.tls import amqp_ssl_options

REPO = Path(__file__).resolve().parents[2]
LOWEST = REPO / "constraints" / "lowest.txt"


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = (Requirement(line) for line in project["dependencies"])
    return {canonicalize_name(req.name): req for req in requirements}


def pinned() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in LOWEST.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        assert separator, f"{LOWEST.name}: {raw!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name.strip())] = Version(version.strip())
    return pins


def floor(requirement: Requirement) -> Version:
    lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(lows) == 1, f"{requirement}: declare exactly one floor (>=)"
    return lows[0]


def test_every_runtime_dependency_is_pinned_at_its_floor() -> None:
    requirements, pins = declared(), pinned()
    assert set(pins) == set(requirements), "constraints/lowest.txt and dependencies differ"
    mismatched = {
        name: (str(floor(req)), str(pins[name]))
        for name, req in requirements.items()
        if floor(req) != pins[name]
    }
    assert not mismatched, f"declared floor != pinned lowest version: {mismatched}"


def test_every_floor_is_allowed_by_its_own_specifier() -> None:
    """A floor that an exclusion (!=) or a cap removes would test a version users never get."""
    for name, requirement in declared().items():
        assert requirement.specifier.contains(pinned()[name]), f"{name}: {requirement}"


#: Dependencies whose major number says nothing about their API (packaging's is the year).
UNCAPPED = {"packaging"}


def test_every_dependency_has_an_upper_bound() -> None:
    """The next major release may break the API; it gets tested before it is allowed."""
    for name, requirement in declared().items():
        capped = any(s.operator == "<" for s in requirement.specifier)
        assert capped != (name in UNCAPPED), str(requirement)


def test_installed_py_amqp_accepts_every_key_of_our_ssl_dict() -> None:
    """py-amqp passes the ssl dict as keywords to `_wrap_socket_sni`; before 5.4 it had no
    `tls_minimum_version`, and the TypeError came only when a TLS connection was opened."""
    from amqp.transport import SSLTransport

    tls = TLSSettings("broker.example.test", Path("ca.pem"), Path("c.pem"), Path("k.pem"))
    accepted = inspect.signature(SSLTransport._wrap_socket_sni).parameters
    assert set(amqp_ssl_options(tls)) <= set(accepted)
