"""Child processes of the stack: started in their own session, stopped with the whole group."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
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


def reachable_by_others(path: Path) -> bool:
    """Whether any local user can reach `path`: every folder above it searchable by "others".

    A server dropped to `nobody` is "others" to root's files, so this is what decides whether
    it can run a binary or read a file there. `/root` (0700) and `mktemp -d` folders fail it.
    """
    path = path.absolute()
    for folder in (*reversed(path.parents), path):
        try:
            mode = folder.stat().st_mode
        except OSError:
            return False
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return False
    return True


def _readable_by_others(mode: int) -> bool:
    executable = bool(mode & stat.S_IXUSR)
    return bool(mode & stat.S_IROTH) and (not executable or bool(mode & stat.S_IXOTH))


def _link_or_copy(source: str, target: str) -> object:
    """Hard-link a file others can already read (instant, no space); copy anything else.

    A hard link shares the inode, so its mode must never be changed: only copies get o+r(x).
    """
    mode = os.stat(source).st_mode
    if _readable_by_others(mode):
        try:
            os.link(source, target)
        except OSError:
            pass
        else:
            return target
    shutil.copy2(source, target)
    extra = (
        stat.S_IROTH | stat.S_IRGRP | (stat.S_IXOTH | stat.S_IXGRP if mode & stat.S_IXUSR else 0)
    )
    os.chmod(target, mode | extra)
    return target


def stage_tree(source: Path, target: Path) -> Path:
    """`source` (an install tree: bin/, lib/, share/) made reachable under `target`.

    Servers that must not run as root read their binaries and libraries as the service user.
    When those live under a folder it cannot traverse (a checkout in /root, a 0700 temp folder),
    the tree is hard-linked (or copied) into the stack's own folder instead of changing the
    permissions of anything outside it. Relocatable installs (PostgreSQL's are: it finds lib/
    and share/ relative to its binary) run unchanged from there.
    """
    if target.exists():
        return target
    try:
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        for folder, _dirs, _files in os.walk(target):
            os.chmod(folder, 0o755)  # folders copytree made: ours
    except OSError as exc:
        raise StackError(
            f"could not stage {source} into {target} for the unprivileged service user: {exc};"
            " fix: free disk space, or install the server from the system's packages"
        ) from None
    return target


def require_reachable(root: Path, user: tuple[int, int] | None) -> None:
    """StackError if the service user could not reach the stack folder `root`."""
    if user is None or reachable_by_others(root):
        return
    blocker = next(
        (f for f in (*reversed(root.parents), root) if not f.stat().st_mode & stat.S_IXOTH), root
    )
    raise StackError(
        f"the stack folder {root} is inside {blocker} (mode {blocker.stat().st_mode & 0o777:o}),"
        f" which the unprivileged user {SERVICE_USER!r} that runs PostgreSQL cannot enter;"
        " fix: point TMPDIR at a folder every user can traverse, e.g. TMPDIR=/tmp"
    )


def _demote(user: tuple[int, int] | None) -> Callable[[], None] | None:
    """A preexec_fn that drops to `user` (uid, gid), or None to stay who we are."""
    if user is None:
        return None

    def demote() -> None:
        os.setgid(user[1])
        os.setgroups([])
        os.setuid(user[0])

    return demote


def run_as(
    user: tuple[int, int] | None,
    argv: list[str],
    log: Path,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run a one-off command (initdb) as `user`; StackError with its output if it fails."""
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=_demote(user),
            stdin=subprocess.DEVNULL,
            cwd="/",
            env={**os.environ, **(env or {})},
        )
    except OSError as exc:
        raise StackError(f"could not run {argv[0]}: {exc}") from None
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
            try:
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
            except OSError as exc:
                raise StackError(f"could not start {self.name} ({self.argv[0]}): {exc}") from None

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
