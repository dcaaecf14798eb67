"""The rendered `rabbitmq` template, run for real: a node from its ConfigMap and Secret, reached
through a router stand-in configured from its Route.

Only what cannot hold outside Kubernetes is rewritten (see `local_rabbitmq_conf`): TLS file
paths, the listener address, k8s peer discovery -> classic_config, the Prometheus port. The node
is separate from the session stack's broker (own folder, node name, epmd, ports); the stack
supplies only the PKI and the Route host its certificate covers.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import amqp
import kombu
import pytest
from kombu.utils.url import url_to_parts

from packit_broker import celery_config
from packit_broker.config import HostPort
from packit_broker.queues import REPLICAS_SERVER_PROPERTY
from packit_broker.render import load_template, process
from packit_broker.router import ALLOWLIST_ANNOTATION, TUNNEL_TIMEOUT_ANNOTATION
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process
from packit_broker.stack.rabbitmq import amqps_login
from tests.integration.test_check import run_check
from tests.rig.rendered import (
    RenderedBroker,
    RenderedCluster,
    rendered_broker,
    start_route_router,
)

pytestmark = pytest.mark.integration


@dataclass
class Live:
    rendered: dict[str, Any]
    broker: RenderedBroker
    cluster: RenderedCluster
    router_port: int
    route_host: str
    ca_file: Path

    @property
    def node_port(self) -> int:
        return self.cluster.nodes[0].amqps_port

    def env(self, username: str | None = None, password: str | None = None) -> dict[str, str]:
        """`PACKIT_BROKER_*` of a worker in the private cluster, dialling the router."""
        user = quote(username or self.cluster.username, safe="")
        secret = quote(password or self.cluster.password, safe="")
        return {
            "PACKIT_BROKER_URL": f"amqps://{user}:{secret}@{self.route_host}:443/",
            "PACKIT_BROKER_CA_FILE": str(self.ca_file),
            "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{self.router_port}",
        }


@contextlib.contextmanager
def rendered_node(stack: Stack, root: Path) -> Iterator[Live]:
    """One RabbitMQ node from the rendered rabbitmq template (Prometheus plugin on), behind a
    router stand-in configured from its Route, in `root`; stopped afterwards."""
    rendered = process(load_template("rabbitmq"), {"ROUTE_HOST": stack.rabbit_host})
    broker = rendered_broker(rendered)
    cluster = RenderedCluster(root / "nodes", broker, stack.pki, server_hostname=stack.rabbit_host)
    router: Process | None = None
    try:
        started = time.monotonic()
        cluster.start(timeout=90)
        print(f"rendered RabbitMQ node ready in {time.monotonic() - started:.1f}s")
        router, router_port = start_route_router(
            root / "router",
            broker.route,
            HostPort("127.0.0.1", cluster.nodes[0].amqps_port),
            stack.pki,
        )
        yield Live(rendered, broker, cluster, router_port, stack.rabbit_host, stack.pki.ca_file)
    finally:
        if router is not None:
            router.stop()
        cluster.stop()


@pytest.fixture(scope="module")
def live(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with rendered_node(stack, tmp_path_factory.mktemp("rendered-rabbitmq")) as node:
        yield node


def _amqp_connection(live: Live, env: dict[str, str]) -> amqp.Connection:
    """py-amqp exactly as Celery would build it from `celery_config(env)`."""
    config = celery_config(env)
    assert f"@127.0.0.1:{live.router_port}/" in config["broker_url"]
    url = url_to_parts(config["broker_url"])
    return amqp.Connection(
        f"{url.hostname}:{url.port}",
        userid=url.username,
        password=url.password,
        ssl=config["broker_use_ssl"],
        connect_timeout=5,
    )


def test_rendered_credentials_come_from_the_secret(live: Live) -> None:
    """The container's RABBITMQ_DEFAULT_USER/PASS are secretKeyRefs into the rendered Secret."""
    secret = next(
        s
        for s in live.rendered["items"]
        if s["kind"] == "Secret" and s["metadata"]["name"] == "rabbitmq-credentials"
    )
    assert live.cluster.username == secret["stringData"]["username"] == "packit"
    assert live.cluster.password == secret["stringData"]["password"]
    assert len(live.cluster.password) == 32
    # ... and the node created that user (and no guest) on first boot.
    users = live.cluster.ctl_run(live.cluster.nodes[0], "list_users", "--quiet").split()
    assert "packit" in users and "guest" not in users


def test_secret_credentials_get_in_through_the_rendered_route(live: Live) -> None:
    """celery_config() with the Secret's credentials: TLS + SNI through the router, a round trip."""
    connection = _amqp_connection(live, live.env())
    connection.connect()
    try:
        sock = connection.transport.sock
        assert sock.server_hostname == live.route_host
        channel = connection.channel()
        queue, _, _ = channel.queue_declare("", exclusive=True)
        channel.basic_publish(amqp.Message(b"via the rendered Route"), "", queue)
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = channel.basic_get(queue, no_ack=True)
        assert message is not None and message.body == b"via the rendered Route"
    finally:
        connection.close()
    # Celery's own transport (kombu) with the same settings also gets in.
    config = celery_config(live.env())
    conn = kombu.Connection(config["broker_url"], ssl=config["broker_use_ssl"], connect_timeout=5)
    try:
        conn.connect()
        assert conn.connected
    finally:
        conn.release()


def test_one_node_announces_itself_and_check_says_so(live: Live) -> None:
    """The ConfigMap's advanced.config reaches the node: it announces REPLICAS (1) to clients,
    and `check` through the router reports one node (nothing to replicate) - no warning."""
    connection = _amqp_connection(live, live.env())
    connection.connect()
    try:
        assert connection.server_properties[REPLICAS_SERVER_PROPERTY] in ("1", b"1")
    finally:
        connection.close()
    code, results, _ = run_check(live.env())
    (found,) = [r for r in results if r["layer"] == "cluster"]
    assert found["status"] == "info" and "REPLICAS=1: one node" in found["seen"], found
    assert code == 0, results


def test_router_is_configured_from_the_rendered_route(live: Live) -> None:
    route = live.broker.route
    assert route["spec"]["host"] == live.route_host
    assert route["spec"]["tls"]["termination"] == "passthrough"
    annotations = route["metadata"]["annotations"]
    assert annotations[ALLOWLIST_ANNOTATION] == ""  # default: no restriction
    text = (live.cluster.root.parent / "router" / "haproxy.cfg").read_text()
    assert f"timeout tunnel {annotations[TUNNEL_TIMEOUT_ANNOTATION]}" in text
    assert f"-m str {live.route_host}" in text
    assert "allowlist" not in text


def test_guest_cannot_log_in(live: Live) -> None:
    """guest/guest: neither through the router nor on the node's own (loopback) listener."""
    with pytest.raises(amqp.exceptions.AccessRefused):
        _amqp_connection(live, live.env("guest", "guest")).connect()
    assert not amqps_login(
        live.node_port,
        username="guest",
        password="guest",
        ca_file=live.ca_file,
        server_hostname=live.route_host,
    )
    with pytest.raises(amqp.exceptions.AccessRefused):
        _amqp_connection(live, live.env(password="not-the-password")).connect()


def _plain_amqp(port: int, live: Live) -> None:
    connection = amqp.Connection(
        f"127.0.0.1:{port}",
        userid=live.cluster.username,
        password=live.cluster.password,
        connect_timeout=3,
        read_timeout=10,
    )
    try:
        connection.connect()
    finally:
        connection.collect()


def test_plaintext_amqp_is_refused(live: Live) -> None:
    """No plaintext AMQP: not on the TLS port, not through the router, no TCP listener at all."""
    with pytest.raises(Exception):  # noqa: B017 - py-amqp's errors vary; any failure will do
        _plain_amqp(live.node_port, live)
    with pytest.raises(Exception):  # noqa: B017
        _plain_amqp(live.router_port, live)
    listeners = live.cluster.ctl_run(
        live.cluster.nodes[0],
        "eval",
        "[{P, Port} || {listener, _, P, _, _, Port, _} <- rabbit_networking:active_listeners()].",
    )
    assert "'amqp/ssl'" in listeners, listeners
    assert "{amqp," not in listeners, listeners
    assert str(live.node_port) in listeners


def test_without_sni_the_router_does_not_reach_the_node(live: Live) -> None:
    """An ssl dict without server_hostname sends no SNI: the router's own certificate answers."""
    ctx = ssl.create_default_context(cafile=str(live.ca_file))
    ctx.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", live.router_port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw)


def test_rendered_consumer_timeout_is_in_effect(live: Live) -> None:
    configmap = next(i for i in live.rendered["items"] if i["kind"] == "ConfigMap")
    assert "consumer_timeout = 7200000" in configmap["data"]["rabbitmq.conf"]
    value = live.cluster.ctl_run(
        live.cluster.nodes[0], "eval", "application:get_env(rabbit, consumer_timeout)."
    )
    assert value.strip() == "{ok,7200000}"


# -- optional: the rendered config as a 3-node cluster -------------------------------------------


def _login(cluster: RenderedCluster, port: int, **options: Any) -> amqp.Connection:
    connection = amqp.Connection(
        f"127.0.0.1:{port}",
        userid=cluster.username,
        password=cluster.password,
        ssl={
            "ca_certs": str(cluster.pki.ca_file),
            "server_hostname": cluster.server_hostname,
            "cert_reqs": ssl.CERT_REQUIRED,
        },
        connect_timeout=5,
        **options,
    )
    connection.connect()
    return connection


def _drain(cluster: RenderedCluster, port: int, queue: str, expected: int) -> list[bytes]:
    """Get every message of `queue` from the node on `port`, retrying while a leader is elected."""
    bodies: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(bodies) < expected and time.monotonic() < deadline:
        try:
            connection = _login(cluster, port)
        except Exception:
            time.sleep(0.5)
            continue
        try:
            channel = connection.channel()
            while len(bodies) < expected:
                message = channel.basic_get(queue)
                if message is None:
                    time.sleep(0.2)
                    if time.monotonic() > deadline:
                        break
                    continue
                bodies.append(message.body)
                channel.basic_ack(message.delivery_tag)
        except amqp.exceptions.AMQPError:
            time.sleep(0.5)
        finally:
            connection.collect()
    return bodies


@pytest.mark.fault
def test_rendered_cluster_keeps_a_quorum_queue_when_its_leader_dies(
    stack: Stack, tmp_path: Path
) -> None:
    """REPLICAS=3: three nodes from the rendered config (classic_config static list instead of
    k8s discovery), started together; a quorum queue survives SIGKILL of its leader."""
    rendered = process(
        load_template("rabbitmq"), {"ROUTE_HOST": stack.rabbit_host, "REPLICAS": "3"}
    )
    cluster = RenderedCluster(
        tmp_path / "nodes",
        rendered_broker(rendered),
        stack.pki,
        server_hostname=stack.rabbit_host,
        replicas=3,
    )
    try:
        started = time.monotonic()
        cluster.start(timeout=150)
        print(f"rendered 3-node cluster ready in {time.monotonic() - started:.1f}s")
        names = {node.name for node in cluster.nodes}
        for node in cluster.nodes:
            running = cluster.ctl_run(node, "eval", "rabbit_nodes:all_running().")
            assert all(name in running for name in names), running

        queue = f"quorum-{uuid.uuid4().hex[:8]}"
        connection = _login(cluster, cluster.nodes[0].amqps_port, confirm_publish=True)
        try:
            channel = connection.channel()
            channel.queue_declare(
                queue, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
            )
            for i in range(50):
                channel.basic_publish(amqp.Message(f"m{i}".encode(), delivery_mode=2), "", queue)
        finally:
            connection.close()

        info = json.loads(
            cluster.ctl_run(
                cluster.nodes[0],
                "list_queues",
                "name",
                "type",
                "leader",
                "members",
                "--formatter",
                "json",
                "--quiet",
            )
        )
        row = next(q for q in info if q["name"] == queue)
        assert row["type"] == "quorum"
        assert set(row["members"]) == names
        leader = next(node for node in cluster.nodes if node.name == row["leader"])
        leader.process.kill()
        survivor = next(node for node in cluster.nodes if node is not leader)
        bodies = _drain(cluster, survivor.amqps_port, queue, 50)
        assert sorted(bodies) == sorted(f"m{i}".encode() for i in range(50))
    finally:
        cluster.stop()
