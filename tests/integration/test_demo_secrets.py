"""Issue 9: the demo puts no password in any child's argv (`ps`) nor in its output.

The demo runs for real with `--keep`; while it runs, the argv of every process descending from
it is sampled from /proc. Its passwords (random per stack) are read afterwards from the
`client.env` file it leaves for other shells, which must be readable by this user only.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

pytestmark = pytest.mark.integration

#: USER:PASSWORD@ in a URL: what must never be in an argv.
CREDENTIALS_IN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/@]*:[^\s/@]+@", re.IGNORECASE)
READY = "Press Ctrl-C to tear it down."
TIMEOUT = 420.0


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants_argv(root: int) -> dict[int, str]:
    children = _children()
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found[pid] = raw.replace(b"\0", b" ").decode(errors="replace")
    return found


def _passwords(env_file: Path) -> set[str]:
    """Every password in the URLs of the demo's client.env."""
    found = set()
    for line in env_file.read_text().splitlines():
        value = line.partition("=")[2].strip("'")
        match = re.match(r"[a-z]+://[^/@]*:([^/@]+)@", value)
        if match:
            found.add(unquote(match.group(1)))
    return found


def test_demo_puts_no_password_in_argv_or_output(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    argvs: set[str] = set()
    with log.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "packit_broker", "demo", "--keep"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        env_file = None
        while demo.poll() is None and time.monotonic() < deadline:
            argvs.update(_descendants_argv(demo.pid).values())
            found = re.search(r"\. (\S+/client\.env);", log.read_text())
            if found and READY in log.read_text():
                env_file = Path(found.group(1))
                break
            time.sleep(0.1)
        assert env_file is not None, log.read_text()
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        passwords = _passwords(env_file)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=120)
    output = log.read_text()
    assert code == 0, output
    assert len(passwords) >= 3, "expected the broker, database and Redis passwords"
    assert any("packit_broker migrate" in argv for argv in argvs), "migrate was never sampled"
    for argv in argvs:
        assert not CREDENTIALS_IN_URL.search(argv), argv
        assert not any(secret in argv for secret in passwords), argv
    assert not any(secret in output for secret in passwords), output
