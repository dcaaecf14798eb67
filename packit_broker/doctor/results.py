"""The report: one `CheckResult` per layer, gathered (secrets scrubbed) by `_Report`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from packit_broker.config import ConfigError
from packit_broker.errors import Diagnosis

Status = Literal["ok", "warn", "FAIL", "info"]


@dataclass(frozen=True)
class CheckResult:
    """One line of the report: which endpoint, which layer, how it went, and what to do."""

    name: str  # broker | database | result-backend
    endpoint: str  # display URL, never with a password
    layer: str
    status: Status
    seen: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "endpoint": self.endpoint,
            "layer": self.layer,
            "status": self.status,
            "seen": self.seen,
            "fix": self.fix,
        }


@dataclass
class _Report:
    name: str
    endpoint: str
    secrets: tuple[str, ...] = ()
    results: list[CheckResult] = field(default_factory=list)

    def _scrub(self, text: str) -> str:
        """Mask the password wherever what was *seen* (a server's or a library's text) echoes it."""
        for secret in self.secrets:
            if len(secret) >= 8:
                text = text.replace(secret, "***")
            elif secret:  # short ones only as a whole word, not inside "expires"
                text = re.sub(rf"(?<![\w]){re.escape(secret)}(?![\w])", "***", text)
        return text

    def add(self, layer: str, status: Status, seen: str, fix: str = "") -> None:
        """One line; *fix* is not scrubbed: it is this tool's own text, never a password.

        Every fix is a fixed phrase or built from the endpoint's non-secret parts (host, user,
        vhost, variable names). Masking a short password as a word there only garbled it - a
        password ``wrong`` made ``fix: *** user name or password`` - and so told the reader
        which word the password was.
        """
        self.results.append(
            CheckResult(self.name, self.endpoint, layer, status, self._scrub(seen), fix)
        )

    def ok(self, layer: str, seen: str) -> None:
        self.add(layer, "ok", seen)

    def warn(self, layer: str, seen: str, fix: str) -> None:
        self.add(layer, "warn", seen, fix)

    def info(self, layer: str, seen: str) -> None:
        self.add(layer, "info", seen)

    def fail(self, layer: str, seen: str, fix: str) -> None:
        self.add(layer, "FAIL", seen, fix)

    def diagnosed(self, diagnosis: Diagnosis) -> None:
        """A failure classified by `packit_broker.errors`, the one shared with `migrate`."""
        self.fail(diagnosis.layer, diagnosis.seen, diagnosis.fix)


def config_failure(name: str, exc: ConfigError) -> CheckResult:
    """A setting that does not parse: the problem is what was seen, the fix says what to do."""
    return CheckResult(name, exc.variable, "config", "FAIL", exc.problem, config_fix(exc))


def config_fix(exc: ConfigError) -> str:
    """``set X ...`` for a missing variable, ``correct X ...`` for a wrong one (not ``fix X``)."""
    verb = "set" if exc.problem.startswith("not set") else "correct"
    return f"{verb} {exc.variable} (every variable and its form: docs/usage.md)"


def healthy(results: Sequence[CheckResult]) -> bool:
    return not any(result.failed for result in results)
