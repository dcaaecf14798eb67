"""Pure: an HAProxy configuration that behaves like the OpenShift router for passthrough Routes.

What matters for clients (see ../shared/research.md): a `mode tcp` frontend that waits up to
5 s for a ClientHello, picks the backend by the exact, lower-cased SNI, and hands anything else
(no SNI, unknown host) to a TLS-terminating HTTP frontend holding the router's own wildcard
certificate; `timeout client/server 30s` until then, `timeout tunnel` afterwards.

A Route whose Service has several endpoints (a RabbitMQ cluster) gets what the router's template
gives a passthrough backend: `balance source` (or the Route's balance annotation),
`hash-type consistent`, `timeout check 5000ms` and a TCP health check every 5000 ms on each
server (HAProxy's default `fall 3`/`rise 2`): a pod that refuses connections is taken out
after 10-15 s, one that does not answer at all (a network cut) after ~30 s, as each check then
waits out `timeout check`. The router never closes the client side of a session whose server
went away silently: only the client's AMQP heartbeat notices that.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packit_broker.config import HostPort

TUNNEL_TIMEOUT_ANNOTATION = "haproxy.router.openshift.io/timeout-tunnel"
TIMEOUT_ANNOTATION = "haproxy.router.openshift.io/timeout"
ALLOWLIST_ANNOTATION = "haproxy.router.openshift.io/ip_allowlist"
#: The name OpenShift before 4.18 reads (and later ones still honour when the new one is absent).
OLD_ALLOWLIST_ANNOTATION = "haproxy.router.openshift.io/ip_whitelist"
BALANCE_ANNOTATION = "haproxy.router.openshift.io/balance"
CHECK_INTERVAL_ANNOTATION = "router.openshift.io/haproxy.health.check.interval"
DEFAULT_TUNNEL_TIMEOUT = "1h"
#: The router's defaults for a passthrough backend (ROUTER_TCP_BALANCE_SCHEME,
#: ROUTER_BACKEND_CHECK_INTERVAL).
DEFAULT_BALANCE = "source"
DEFAULT_CHECK_INTERVAL = "5000ms"
BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "source", "random")
_TIMEOUT = re.compile(r"^\d+(us|ms|s|m|h|d)?$")


@dataclass(frozen=True)
class PassthroughRoute:
    name: str
    host: str
    backend: HostPort
    tunnel_timeout: str = DEFAULT_TUNNEL_TIMEOUT
    allowlist: tuple[str, ...] = ()
    #: The Service's other endpoints (pods), after `backend`: a cluster behind one Route.
    more_backends: tuple[HostPort, ...] = ()
    balance: str = DEFAULT_BALANCE
    check_interval: str = DEFAULT_CHECK_INTERVAL

    @property
    def backends(self) -> tuple[HostPort, ...]:
        return (self.backend, *self.more_backends)


@dataclass(frozen=True)
class RouterConfig:
    bind: HostPort
    default_cert_pem: Path  # the router's own certificate (key + chain)
    sni_socket: Path  # unix socket of the internal TLS-terminating frontend
    routes: tuple[PassthroughRoute, ...] = field(default_factory=tuple)
    #: HAProxy's runtime API (the router's `stats socket ... level admin`), if wanted: the rig
    #: takes a pod out of a backend through it, as a Service's endpoints change.
    admin_socket: Path | None = None
    #: The OpenShift router's ROUTER_HARD_STOP_AFTER: how long the previous HAProxy of a reload
    #: keeps its sessions before it is stopped, cutting every client still on it.
    hard_stop_after: str | None = None


def _backend_name(route: PassthroughRoute) -> str:
    return "be_tcp_" + re.sub(r"[^A-Za-z0-9_]", "_", route.name)


def server_name(route: PassthroughRoute, index: int) -> str:
    """`backend/server` of the route's `index`th endpoint, for HAProxy's runtime API."""
    server = "pod" if len(route.backends) == 1 else f"pod{index}"
    return f"{_backend_name(route)}/{server}"


def _route_backend(route: PassthroughRoute) -> list[str]:
    lines = [f"backend {_backend_name(route)}", f"  timeout tunnel {route.tunnel_timeout}"]
    if route.allowlist:
        lines.append(f"  acl allowlist src {' '.join(route.allowlist)}")
        lines.append("  tcp-request content reject if !allowlist")
    servers = route.backends
    if len(servers) == 1:  # the router health-checks only when there is a choice
        lines.append(f"  server pod {route.backend} weight 1")
        return lines
    lines += [f"  balance {route.balance}", "  hash-type consistent", "  timeout check 5000ms"]
    for number, server in enumerate(servers):
        lines.append(f"  server pod{number} {server} weight 1 check inter {route.check_interval}")
    return lines


def haproxy_config(config: RouterConfig) -> str:
    """The full haproxy.cfg text."""
    lines = [
        "global",
        "  maxconn 4096",
        *([f"  hard-stop-after {config.hard_stop_after}"] if config.hard_stop_after else []),
        *(
            [f"  stats socket {config.admin_socket} mode 600 level admin"]
            if config.admin_socket
            else []
        ),
        "defaults",
        "  mode tcp",
        "  timeout connect 5s",
        "  timeout client 30s",
        "  timeout server 30s",
        "  timeout tunnel 1h",
        "  timeout http-request 10s",
        "",
        "frontend public_ssl",
        f"  bind {config.bind}",
        "  tcp-request inspect-delay 5s",
        "  tcp-request content accept if { req_ssl_hello_type 1 }",
    ]
    for route in config.routes:
        lines.append(
            f"  use_backend {_backend_name(route)} if {{ req.ssl_sni,lower -m str "
            f"{route.host.lower()} }}"
        )
    lines += [
        "  default_backend be_sni",
        "",
        "backend be_sni",
        f"  server fe_sni unix@{config.sni_socket} weight 1 send-proxy",
        "",
        "frontend fe_sni",
        "  mode http",
        f"  bind unix@{config.sni_socket} ssl crt {config.default_cert_pem} accept-proxy",
        "  http-request return status 503 content-type text/plain"
        ' string "Application is not available"',
        "",
    ]
    for route in config.routes:
        lines += [*_route_backend(route), ""]
    return "\n".join(lines)


def _annotation(
    annotations: Mapping[str, Any], key: str, default: str, valid: Callable[[str], bool], name: str
) -> str:
    value = str(annotations.get(key) or default)
    if not valid(value):
        raise ValueError(f"Route {name}: bad {key} {value!r}")
    return value


def route_from_manifest(
    route: Mapping[str, Any], backend: HostPort, more_backends: Sequence[HostPort] = ()
) -> PassthroughRoute:
    """Read host and router annotations from a rendered `Route` object (passthrough only).

    `backend` and `more_backends` are the endpoints of the Service the Route points at.
    """
    spec = route.get("spec", {})
    termination = spec.get("tls", {}).get("termination")
    if termination != "passthrough":
        raise ValueError(f"Route {route['metadata']['name']}: termination {termination!r}")
    annotations = route.get("metadata", {}).get("annotations", {}) or {}
    timeout = annotations.get(TUNNEL_TIMEOUT_ANNOTATION) or annotations.get(TIMEOUT_ANNOTATION)
    timeout = timeout or DEFAULT_TUNNEL_TIMEOUT
    if not _TIMEOUT.match(timeout):
        raise ValueError(f"Route {route['metadata']['name']}: bad timeout {timeout!r}")
    allowlist = tuple(
        annotations.get(ALLOWLIST_ANNOTATION, annotations.get(OLD_ALLOWLIST_ANNOTATION, "")).split()
    )
    name = str(route["metadata"]["name"])
    balance = _annotation(
        annotations, BALANCE_ANNOTATION, DEFAULT_BALANCE, BALANCE_ALGORITHMS.__contains__, name
    )
    interval = _annotation(
        annotations,
        CHECK_INTERVAL_ANNOTATION,
        DEFAULT_CHECK_INTERVAL,
        lambda v: bool(_TIMEOUT.match(v)),
        name,
    )
    return PassthroughRoute(
        name=name,
        host=str(spec["host"]),
        backend=backend,
        tunnel_timeout=timeout,
        allowlist=allowlist,
        more_backends=tuple(more_backends),
        balance=balance,
        check_interval=interval,
    )
