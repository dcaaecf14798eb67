"""Servers that misbehave on purpose, for `check`: silent, garbage after TLS, a frame trickled
one byte a second, a chain without its intermediate. Each runs in a thread on loopback."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

#: The first bytes RabbitMQ sends after the protocol header: a method frame (type 1, channel 0)
#: carrying Connection.Start (class 10, method 10), of which a trickling server sends a start.
CONNECTION_START = struct.pack(">BHI", 1, 0, 500) + struct.pack(">HH", 10, 10) + b"\x00\x09"

MODES = ("silent", "garbage", "trickle", "no-intermediate")


@contextmanager
def hostile_server(mode: str, ca: Any, host: str, folder: Path) -> Iterator[int]:
    """A server on 127.0.0.1 misbehaving as `mode`; yields its port. `ca` is a trustme.CA."""
    assert mode in MODES, mode
    context = None
    if mode != "silent":
        issuer = ca.create_child_ca() if mode == "no-intermediate" else ca
        leaf = issuer.issue_cert(host)
        cert, key = folder / f"{mode}.crt", folder / f"{mode}.key"
        # Without its intermediate, the chain the server sends ends at the leaf.
        pems = leaf.cert_chain_pems[:1] if mode == "no-intermediate" else leaf.cert_chain_pems
        cert.write_bytes(b"".join(p.bytes() for p in pems))
        leaf.private_key_pem.write_to_path(str(key))
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)
            threading.Thread(
                target=_misbehave, args=(mode, conn, context, stop), daemon=True
            ).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)
        for conn in held:
            with suppress(OSError):
                conn.close()


def _misbehave(
    mode: str, conn: socket.socket, context: ssl.SSLContext | None, stop: threading.Event
) -> None:
    with suppress(OSError, ssl.SSLError):
        if context is None:  # silent: accept, read, never answer
            while not stop.is_set() and conn.recv(4096):
                pass
            return
        conn = context.wrap_socket(conn, server_side=True)
        conn.settimeout(None)
        if mode == "garbage":
            conn.recv(8)  # the AMQP protocol header
            while not stop.is_set():
                conn.sendall(os.urandom(64))
                time.sleep(0.5)
        elif mode == "trickle":
            conn.recv(8)
            for byte in CONNECTION_START * 100:
                if stop.is_set():
                    return
                conn.sendall(bytes([byte]))
                time.sleep(1.0)
        else:  # no-intermediate: a client that trusts only the root never gets this far
            conn.recv(8)
