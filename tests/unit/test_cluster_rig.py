"""Pure parts of the three-host cluster rig (tests/rig/cluster.py, tests/rig/rendered.py)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from packit_broker.render import load_template, process
from packit_broker.stack.certs import Pki, ServerCert
from tests.rig.cluster import pick_network
from tests.rig.rendered import local_rabbitmq_conf, rendered_broker

Net = ipaddress.IPv4Network


def test_the_rig_network_overlaps_nothing_the_machine_uses() -> None:
    assert pick_network([]) == Net("198.51.100.0/28")
    used = [Net("192.0.2.0/24"), Net("198.51.100.0/28"), Net("127.0.0.0/8")]
    assert pick_network(used) == Net("198.51.100.16/28")
    assert pick_network([Net("198.51.100.0/24")]) == Net("203.0.113.0/28")


def test_each_host_listens_on_its_own_address_and_lists_its_peers(tmp_path: Path) -> None:
    rendered = process(load_template("rabbitmq"), {"ROUTE_HOST": "a.example.com", "REPLICAS": "3"})
    broker = rendered_broker(rendered)
    pki = Pki(
        folder=tmp_path,
        ca_file=tmp_path / "ca.pem",
        server=ServerCert(tmp_path / "s.pem", tmp_path / "s.key"),
        router_ca_file=tmp_path / "rca.pem",
        router_default_pem=tmp_path / "r.pem",
        client=ServerCert(tmp_path / "c.pem", tmp_path / "c.key"),
    )
    conf = local_rabbitmq_conf(
        broker.rabbitmq_conf,
        pki=pki,
        amqps_port=5671,
        prometheus_port=15692,
        classic_nodes=["rabbit@198.51.100.2", "rabbit@198.51.100.3"],
        listen_host="198.51.100.2",
    )
    assert "listeners.ssl.default = 198.51.100.2:5671" in conf
    assert "cluster_formation.classic_config.nodes.2 = rabbit@198.51.100.3" in conf
    assert "cluster_partition_handling = pause_minority" in conf
    assert "net_ticktime = 15" in conf
    # What the Pod gets besides the Secret: longnames, the replica count for the preStop hook.
    assert broker.plain_env["RABBITMQ_USE_LONGNAME"] == "true"
    assert broker.plain_env["RABBITMQ_REPLICAS"] == "3"
    assert "RABBITMQ_NODENAME" not in broker.plain_env  # $(POD_NAME): Kubernetes only
    assert broker.pre_stop[:2] == ("sh", "-c")
    assert "await_online_quorum_plus_one" in broker.pre_stop[2]
    assert "rabbitmq-upgrade drain" in broker.pre_stop[2]
