"""Run the router stand-in (HAProxy) for a set of passthrough Routes; used by every test rig."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
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
) -> Process:
    """Write and validate haproxy.cfg under `folder`; the (not yet started) HAProxy process.

    With `admin`, HAProxy's runtime API listens on `folder`/admin.sock (see `runtime_command`).
    """
    binary = require("haproxy", "haproxy")
    folder.mkdir(parents=True, exist_ok=True)
    config = RouterConfig(
        bind=HostPort("127.0.0.1", port),
        default_cert_pem=default_cert_pem,
        sni_socket=folder / "fe_sni.sock",
        routes=routes,
        admin_socket=folder / "admin.sock" if admin else None,
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
) -> Process:
    """A running router stand-in on 127.0.0.1:`port`; stopped again if it does not come up."""
    process = router_process(folder, port, default_cert_pem, routes, admin=admin)
    process.start()
    try:
        wait_until(lambda: tcp_open(port), process, 20, f"haproxy (router on {port})")
    except BaseException:
        process.stop()
        raise
    return process


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
