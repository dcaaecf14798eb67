"""Issue: check/demo. The demo runs end to end and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_end_to_end_leaves_nothing_behind() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "packit_broker", "demo"],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        env=dict(os.environ),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    ran = re.search(r"tasks run by the worker\s+(\d+)", output)
    backlog = re.search(r"tasks in the Redis backlog\s+(\d+)", output)
    assert ran and backlog and ran.group(1) == backlog.group(1)
    assert "quarantined (kept in Redis)     1" in output
    root = re.search(r"stack stopped, (\S+) removed", output)
    assert root is not None
    assert not Path(root.group(1)).exists()
    leftovers = subprocess.run(
        ["pgrep", "-f", root.group(1)], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"
