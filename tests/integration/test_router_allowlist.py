"""The Route's ip_allowlist annotation, as the router stand-in applies it, against real clients."""

from __future__ import annotations

import ssl

import kombu
import pytest

from packit_broker import celery_config
from packit_broker.config import HostPort
from packit_broker.router import ALLOWLIST_ANNOTATION, route_from_manifest
from packit_broker.stack import Stack
from packit_broker.stack.router_process import temporary_router

pytestmark = pytest.mark.integration


def connect_through(stack: Stack, allowlist: str) -> None:
    """Connect like a worker through a router whose Route carries `allowlist`."""
    route = {
        "metadata": {"name": "rabbitmq", "annotations": {ALLOWLIST_ANNOTATION: allowlist}},
        "spec": {"host": stack.rabbit_host, "tls": {"termination": "passthrough"}},
    }
    passthrough = route_from_manifest(route, HostPort("127.0.0.1", stack.amqps_port))
    with temporary_router(stack.pki.router_default_pem, (passthrough,)) as port:
        env = {**stack.broker_env(), "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{port}"}
        config = celery_config(env)
        conn = kombu.Connection(
            config["broker_url"], ssl=config["broker_use_ssl"], connect_timeout=5
        )
        try:
            conn.connect()
        finally:
            conn.release()


def test_allowlisted_client_gets_in(stack: Stack) -> None:
    connect_through(stack, "10.0.0.0/8 127.0.0.0/8")


def test_client_outside_the_allowlist_is_cut_off(stack: Stack) -> None:
    """The router drops the connection after the ClientHello: the TLS handshake never completes.

    Which exception says so varies with CPython patch releases (SSLZeroReturnError on Debian's
    3.11.2, SSLEOFError on 3.11.7+): assert what the user observes, a connection closed during
    the handshake, not a certificate problem and not a timeout.
    """
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)) as caught:
        connect_through(stack, "10.0.0.0/8 192.168.0.0/16")
    assert not isinstance(caught.value, ssl.SSLCertVerificationError)
    assert not isinstance(caught.value, TimeoutError)
