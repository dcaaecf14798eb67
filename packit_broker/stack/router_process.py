"""Run the router stand-in (HAProxy) for a set of passthrough Routes; used by every test rig."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from packit_broker.config import HostPort
from packit_broker.router import PassthroughRoute, RouterConfig, haproxy_config
from packit_broker.stack.processes import Process, StackError, free_port, require, wait_until


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def router_process(
    folder: Path,
    port: int,
    default_cert_pem: Path,
    routes: tuple[PassthroughRoute, ...],
    *,
    admin: bool = False,
    hard_stop_after: str | None = None,
) -> Process:
    """Write and validate haproxy.cfg under `folder`; the (not yet started) HAProxy process.

    With `admin`, HAProxy's runtime API listens on `folder`/admin.sock (see `runtime_command`);
    with `hard_stop_after`, a reload (`reload_router`) cuts the old process's sessions then.
    """
    binary = require("haproxy", "haproxy")
    folder.mkdir(parents=True, exist_ok=True)
    config = RouterConfig(
        bind=HostPort("127.0.0.1", port),
        default_cert_pem=default_cert_pem,
        sni_socket=folder / "fe_sni.sock",
        routes=routes,
        admin_socket=folder / "admin.sock" if admin else None,
        hard_stop_after=hard_stop_after,
    )
    cfg = folder / "haproxy.cfg"
    cfg.write_text(haproxy_config(config))
    check = subprocess.run(
        [binary, "-c", "-f", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check.returncode != 0:
        raise StackError(f"haproxy rejected {cfg}:\n{check.stdout}{check.stderr}")
    return Process("router", [binary, "-db", "-f", str(cfg)], folder / "haproxy.log")


def start_router(
    folder: Path,
    port: int,
    default_cert_pem: Path,
    routes: tuple[PassthroughRoute, ...],
    *,
    admin: bool = False,
    hard_stop_after: str | None = None,
) -> Process:
    """A running router stand-in on 127.0.0.1:`port`; stopped again if it does not come up."""
    process = router_process(
        folder, port, default_cert_pem, routes, admin=admin, hard_stop_after=hard_stop_after
    )
    process.start()
    try:
        wait_until(lambda: tcp_open(port), process, 20, f"haproxy (router on {port})")
    except BaseException:
        process.stop()
        raise
    return process


def reload_router(running: Process, settle: float = 0.5) -> Process:
    """Reload as the OpenShift router does on every Route change: a new HAProxy from the same
    configuration takes over the listeners (`-sf`: the old one stops accepting and keeps its
    sessions until they end or its `hard-stop-after` passes). The new process; the old one
    exits on its own and is the caller's to reap (`Process.stop` after hard-stop-after)."""
    if running.pid is None or not running.running:
        raise StackError("the router to reload is not running")
    argv = list(running.argv)
    if "-sf" in argv:  # an earlier reload's `-sf PID`: only the running one is replaced
        at = argv.index("-sf")
        del argv[at : at + 2]
    successor = Process(running.name, [*argv, "-sf", str(running.pid)], running.log)
    successor.start()
    time.sleep(settle)
    if not successor.running:
        raise StackError(f"the reloaded router exited:\n{successor.log_tail()}")
    return successor


def runtime_command(folder: Path, command: str) -> str:
    """One command to the HAProxy runtime API of a router started with `admin=True`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(folder / "admin.sock"))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@contextlib.contextmanager
def temporary_router(default_cert_pem: Path, routes: tuple[PassthroughRoute, ...]) -> Iterator[int]:
    """A router stand-in of its own (port yielded) for a test, removed with its folder after."""
    folder = Path(tempfile.mkdtemp(prefix="router-"))  # short: unix socket path limit
    port = free_port()
    try:
        process = start_router(folder, port, default_cert_pem, routes)
        try:
            yield port
        finally:
            process.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
