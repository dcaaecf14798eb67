"""`check` against servers that misbehave on purpose: each run ends within 3 x --timeout and
names what it met (tests/rig/hostile.py has the servers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.rig.hostile import hostile_server

pytestmark = pytest.mark.integration

HOST = "rabbitmq.apps.example.test"
TIMEOUT = 5.0  # the default; the deadline leaves 2 s of 15 for starting the process
PASSWORD = "hostile-servers-never-see-it"


def run_check(port: int, ca_file: Path) -> tuple[int, list[dict[str, str]], float]:
    env = {
        **os.environ,
        "PACKIT_BROKER_URL": f"amqps://packit:{PASSWORD}@{HOST}:443/",
        "PACKIT_BROKER_CA_FILE": str(ca_file),
        "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{port}",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "packit_broker", "check", "--json", "--timeout", str(TIMEOUT)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert PASSWORD not in done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout), elapsed


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    import trustme

    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("hostile-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, ca_file


def failure_of(mode: str, authority: tuple[object, Path], tmp_path: Path) -> dict[str, str]:
    ca, ca_file = authority
    with hostile_server(mode, ca, HOST, tmp_path) as port:
        code, results, elapsed = run_check(port, ca_file)
    assert code == 1, results
    assert elapsed < 3 * TIMEOUT, f"{mode}: check took {elapsed:.1f} s (--timeout {TIMEOUT:g})"
    failed = [r for r in results if r["status"] == "FAIL"]
    assert len(failed) == 1, failed
    return failed[0]


def test_a_silent_server_is_called_silent_not_plaintext(
    authority: tuple[object, Path], tmp_path: Path
) -> None:
    failure = failure_of("silent", authority, tmp_path)
    assert failure["layer"] == "tls"
    assert failure["seen"].startswith("silent:") and "plaintext" not in failure["fix"]


def test_garbage_after_the_handshake_is_not_amqp(
    authority: tuple[object, Path], tmp_path: Path
) -> None:
    failure = failure_of("garbage", authority, tmp_path)
    assert failure["layer"] == "amqp"
    assert "not an AMQP broker" in failure["seen"] and "5671" in failure["fix"]


def test_a_trickled_frame_meets_the_deadline(
    authority: tuple[object, Path], tmp_path: Path
) -> None:
    failure = failure_of("trickle", authority, tmp_path)
    assert failure["layer"] == "amqp"
    assert "no complete answer within" in failure["seen"]
    assert "after the certificate layer passed" in failure["seen"]


def test_a_chain_without_its_intermediate_is_the_servers_to_fix(
    authority: tuple[object, Path], tmp_path: Path
) -> None:
    failure = failure_of("no-intermediate", authority, tmp_path)
    assert failure["layer"] == "certificate"
    # Python 3.13+ tells how many certificates the server sent; older ones cannot. Either
    # way a lone leaf may also come from a root the client lacks: both fixes are named.
    if sys.version_info >= (3, 13):
        assert "sent only its own certificate" in failure["seen"]
    assert "intermediate" in failure["fix"] and "tls.crt" in failure["fix"]
    assert "CA_FILE" in failure["fix"]
