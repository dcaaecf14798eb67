"""Pure: the router stand-in's configuration, and reading a rendered Route."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from packit_broker.config import HostPort
from packit_broker.router import (
    ALLOWLIST_ANNOTATION,
    BALANCE_ANNOTATION,
    CHECK_INTERVAL_ANNOTATION,
    TIMEOUT_ANNOTATION,
    TUNNEL_TIMEOUT_ANNOTATION,
    PassthroughRoute,
    RouterConfig,
    haproxy_config,
    route_from_manifest,
)


def route(**annotations: str) -> dict[str, object]:
    return {
        "metadata": {"name": "rabbitmq", "annotations": annotations},
        "spec": {"host": "AMQP.apps.example.com", "tls": {"termination": "passthrough"}},
    }


def test_route_annotations() -> None:
    backend = HostPort("127.0.0.1", 5671)
    plain = route_from_manifest(route(), backend)
    assert plain.tunnel_timeout == "1h" and plain.allowlist == ()
    fallback = route_from_manifest(route(**{TIMEOUT_ANNOTATION: "30m"}), backend)
    assert fallback.tunnel_timeout == "30m"
    both = route_from_manifest(
        route(
            **{
                TIMEOUT_ANNOTATION: "30m",
                TUNNEL_TIMEOUT_ANNOTATION: "2h",
                ALLOWLIST_ANNOTATION: "10.0.0.0/8 192.168.1.5",
            }
        ),
        backend,
    )
    assert both.tunnel_timeout == "2h" and both.allowlist == ("10.0.0.0/8", "192.168.1.5")


def test_route_rejects_edge_termination_and_bad_timeouts() -> None:
    edge = route()
    edge["spec"] = {"host": "x", "tls": {"termination": "edge"}}
    with pytest.raises(ValueError, match="termination"):
        route_from_manifest(edge, HostPort("127.0.0.1", 1))
    with pytest.raises(ValueError, match="timeout"):
        route_from_manifest(route(**{TUNNEL_TIMEOUT_ANNOTATION: "1 hour"}), HostPort("h", 1))


def test_config_routes_by_exact_lowercased_sni(tmp_path: Path) -> None:
    config = RouterConfig(
        bind=HostPort("127.0.0.1", 8443),
        default_cert_pem=tmp_path / "default.pem",
        sni_socket=tmp_path / "sni.sock",
        routes=(
            PassthroughRoute(
                "rabbit-mq",
                "AMQP.apps.example.com",
                HostPort("127.0.0.1", 5671),
                "2h",
                ("10.0.0.0/8",),
            ),
        ),
    )
    text = haproxy_config(config)
    assert "tcp-request inspect-delay 5s" in text
    assert (
        "use_backend be_tcp_rabbit_mq if { req.ssl_sni,lower -m str amqp.apps.example.com }" in text
    )
    assert "default_backend be_sni" in text
    assert "timeout tunnel 2h" in text
    assert "tcp-request content reject if !allowlist" in text
    assert f"ssl crt {tmp_path / 'default.pem'}" in text


def test_haproxy_accepts_the_config(tmp_path: Path) -> None:
    """haproxy -c on the generated text (the integration rig runs it for real)."""
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.fail("haproxy not found: apt-get install haproxy (or scripts/bootstrap.sh)")
    import trustme

    ca = trustme.CA()
    pem = tmp_path / "default.pem"
    cert = ca.issue_cert("*.apps.example.com")
    pem.write_bytes(
        cert.private_key_pem.bytes() + b"".join(c.bytes() for c in cert.cert_chain_pems)
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        haproxy_config(
            RouterConfig(
                bind=HostPort("127.0.0.1", 8443),
                default_cert_pem=pem,
                sni_socket=tmp_path / "s.sock",
                routes=(
                    PassthroughRoute("a", "a.example.com", HostPort("127.0.0.1", 1)),
                    PassthroughRoute(
                        "b",
                        "b.example.com",
                        HostPort("198.51.100.1", 5671),
                        more_backends=(HostPort("198.51.100.2", 5671),),
                    ),
                ),
            )
        )
    )
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def _cluster_route(**annotations: str) -> PassthroughRoute:
    return route_from_manifest(
        route(**annotations),
        HostPort("198.51.100.1", 5671),
        (HostPort("198.51.100.2", 5671), HostPort("198.51.100.3", 5671)),
    )


def _backend_lines(passthrough: PassthroughRoute, tmp_path: Path) -> list[str]:
    text = haproxy_config(
        RouterConfig(
            HostPort("127.0.0.1", 8443), tmp_path / "d.pem", tmp_path / "s", (passthrough,)
        ),
    )
    backend = text.split("backend be_tcp_rabbitmq\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in backend.splitlines()]


def test_a_service_with_several_pods_is_balanced_by_source_with_health_checks(
    tmp_path: Path,
) -> None:
    """As the OpenShift router's passthrough backend: balance source, consistent hashing,
    a TCP check every 5000 ms on each endpoint."""
    lines = _backend_lines(_cluster_route(), tmp_path)
    assert "balance source" in lines and "hash-type consistent" in lines
    assert "timeout check 5000ms" in lines
    assert [line for line in lines if line.startswith("server")] == [
        "server pod0 198.51.100.1:5671 weight 1 check inter 5000ms",
        "server pod1 198.51.100.2:5671 weight 1 check inter 5000ms",
        "server pod2 198.51.100.3:5671 weight 1 check inter 5000ms",
    ]


def test_a_single_pod_is_not_health_checked(tmp_path: Path) -> None:
    """The router adds `check` only when the Service has more than one endpoint."""
    single = route_from_manifest(route(), HostPort("127.0.0.1", 5671))
    lines = _backend_lines(single, tmp_path)
    assert lines[-1] == "server pod 127.0.0.1:5671 weight 1"
    assert not any(line.startswith("balance") for line in lines)


def test_balance_and_check_interval_annotations(tmp_path: Path) -> None:
    custom = _cluster_route(**{BALANCE_ANNOTATION: "roundrobin", CHECK_INTERVAL_ANNOTATION: "2s"})
    lines = _backend_lines(custom, tmp_path)
    assert "balance roundrobin" in lines
    assert "server pod2 198.51.100.3:5671 weight 1 check inter 2s" in lines
    with pytest.raises(ValueError, match="balance"):
        _cluster_route(**{BALANCE_ANNOTATION: "uri"})
    with pytest.raises(ValueError, match="interval"):
        _cluster_route(**{CHECK_INTERVAL_ANNOTATION: "soon"})
