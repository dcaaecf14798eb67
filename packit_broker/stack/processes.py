"""Child processes of the stack: started in their own session, stopped with the whole group."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Unprivileged account for servers that refuse to run as root (PostgreSQL).
SERVICE_USER = "nobody"


class StackError(RuntimeError):
    """A stack service could not be installed, started or reached; says what to do."""


def require(binary: str, package: str, *, where: tuple[str, ...] = ()) -> str:
    """Full path of `binary` or a StackError naming the package that provides it."""
    for folder in where:
        candidate = Path(folder) / binary
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(binary)
    if found:
        return found
    raise StackError(
        f"{binary} not found: install {package} (on Debian 12: `apt-get install {package}`,"
        " or run scripts/bootstrap.sh which installs everything the stack needs)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_user() -> tuple[int, int] | None:
    """(uid, gid) to drop to when running as root, else None (already unprivileged)."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(SERVICE_USER)
    return entry.pw_uid, entry.pw_gid


def chown_tree(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    for folder, _dirs, files in os.walk(path):
        os.chown(folder, *owner)
        for name in files:
            os.chown(os.path.join(folder, name), *owner)


def _demote(user: tuple[int, int] | None) -> Callable[[], None] | None:
    """A preexec_fn that drops to `user` (uid, gid), or None to stay who we are."""
    if user is None:
        return None

    def demote() -> None:
        os.setgid(user[1])
        os.setgroups([])
        os.setuid(user[0])

    return demote


def run_as(user: tuple[int, int] | None, argv: list[str], log: Path) -> None:
    """Run a one-off command (initdb) as `user`; StackError with its output if it fails."""
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_demote(user),
        stdin=subprocess.DEVNULL,
        cwd="/",
    )
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise StackError(
            f"{Path(argv[0]).name} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


@dataclass
class Process:
    """One server process; its output goes to `log`."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    user: tuple[int, int] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.running:
            return
        env = {**os.environ, **self.env}
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_demote(self.user),
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the group, SIGKILL what is left after `timeout`, reap."""
        if self.popen is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.popen.wait(5)
        self._signal_group(signal.SIGKILL)  # stragglers that outlived the leader
        self.popen = None

    def kill(self) -> None:
        """SIGKILL the whole group at once (fault tests)."""
        self._signal_group(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(5)
            self.popen = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(ready: Callable[[], bool], process: Process, timeout: float, what: str) -> None:
    """Poll `ready` until true; fail early (with the log) if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running:
            raise StackError(f"{what} exited during start-up:\n{process.log_tail()}")
        if ready():
            return
        time.sleep(0.2)
    raise StackError(f"{what} not ready after {timeout:.0f}s:\n{process.log_tail()}")
