"""RabbitMQ nodes and a router stand-in run from the *rendered* `rabbitmq` template.

`Stack` writes its own rabbitmq.conf. This module instead takes what `packit-broker render
rabbitmq` (or `oc process`) produces: the ConfigMap's `rabbitmq.conf` and `enabled_plugins`, the
credentials the StatefulSet's container gets from the Secret, the Erlang cookie and the Route.
Only what cannot hold outside Kubernetes is rewritten (`local_rabbitmq_conf`): file paths of
the TLS material, the listener address, the peer discovery backend (k8s -> classic_config) and
the Prometheus port. Everything else (TLS-only, `loopback_users`, `consumer_timeout`,
`cluster_partition_handling`, ...) is exercised exactly as rendered.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packit_broker.config import HostPort
from packit_broker.render import find_objects
from packit_broker.router import route_from_manifest
from packit_broker.stack.certs import Pki
from packit_broker.stack.processes import Process, StackError, free_port, require, wait_until
from packit_broker.stack.rabbitmq import RABBITMQ_SBIN, amqps_login, future_defaults, node_env
from packit_broker.stack.router_process import start_router

K8S_BACKEND = "rabbit_peer_discovery_k8s"
CLASSIC_BACKEND = "classic_config"


@dataclass(frozen=True)
class RenderedBroker:
    """What a RabbitMQ Pod of the rendered template would be given."""

    rabbitmq_conf: str
    enabled_plugins: str
    env: Mapping[str, str] = field(repr=False)  # the container's env from secretKeyRef
    erlang_cookie: str | None = field(repr=False)
    route: Mapping[str, Any]
    #: The container's literal env values (no `$(...)` references), e.g. RABBITMQ_USE_LONGNAME.
    plain_env: Mapping[str, str] = field(default_factory=dict)
    #: The container's preStop hook (argv), as the kubelet runs it before SIGTERM.
    pre_stop: tuple[str, ...] = ()
    #: The ConfigMap's advanced.config (Erlang terms: the server properties), if any.
    advanced_config: str | None = None

    def write_files(self, folder: Path, rabbitmq_conf: str) -> Path:
        """What a Pod finds in /etc/rabbitmq (the ConfigMap: `rabbitmq_conf`, the rendered one
        made local, enabled_plugins, advanced.config) and in $HOME (the Erlang cookie the init
        container copies), written into `folder` as `node_env` expects; rabbitmq.conf's path."""
        conf = folder / "rabbitmq.conf"
        conf.write_text(rabbitmq_conf)
        conf.chmod(0o600)
        (folder / "enabled_plugins").write_text(self.enabled_plugins)
        if self.advanced_config is not None:
            (folder / "advanced.config").write_text(self.advanced_config)
        if self.erlang_cookie is not None:
            cookie = folder / ".erlang.cookie"
            cookie.write_text(self.erlang_cookie)
            cookie.chmod(0o600)
        return conf


def _one(rendered: Mapping[str, Any], kind: str) -> dict[str, Any]:
    found = find_objects(rendered, kind)
    if len(found) != 1:
        raise StackError(f"the rendered template has {len(found)} {kind} objects, expected 1")
    return found[0]


def secret_value(rendered: Mapping[str, Any], name: str, key: str) -> str:
    """A key of a rendered Secret, from `stringData` or (base64) `data`, as a Pod sees it."""
    for secret in find_objects(rendered, "Secret"):
        if secret.get("metadata", {}).get("name") != name:
            continue
        string_data = secret.get("stringData") or {}
        if key in string_data:
            return str(string_data[key])
        data = secret.get("data") or {}
        if key in data:
            return base64.b64decode(str(data[key])).decode()
        raise StackError(f"Secret {name} has no key {key!r}")
    raise StackError(f"the rendered template has no Secret {name!r}")


def rendered_broker(rendered: Mapping[str, Any]) -> RenderedBroker:
    """Pick the parts of a rendered `rabbitmq` template that a local node needs."""
    statefulset = _one(rendered, "StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "rabbitmq")
    env: dict[str, str] = {}
    plain_env: dict[str, str] = {}
    for item in container.get("env", []):
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            env[str(item["name"])] = secret_value(rendered, str(ref["name"]), str(ref["key"]))
        elif "value" in item and "$(" not in str(item["value"]):
            plain_env[str(item["name"])] = str(item["value"])
    pre_stop = ((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}
    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    config_name = config_volume["configMap"]["name"]
    config_map = next(
        c for c in find_objects(rendered, "ConfigMap") if c["metadata"]["name"] == config_name
    )
    cookie_volume = next(
        (v for v in pod["volumes"] if "cookie" in str(v.get("secret", {}).get("secretName"))),
        None,
    )
    cookie = (
        secret_value(rendered, str(cookie_volume["secret"]["secretName"]), "cookie")
        if cookie_volume
        else None
    )
    return RenderedBroker(
        rabbitmq_conf=str(config_map["data"]["rabbitmq.conf"]),
        enabled_plugins=str(config_map["data"]["enabled_plugins"]),
        env=env,
        erlang_cookie=cookie,
        route=_one(rendered, "Route"),
        plain_env=plain_env,
        pre_stop=tuple(str(arg) for arg in pre_stop.get("command", ())),
        advanced_config=config_map["data"].get("advanced.config"),
    )


def _replace_key(lines: list[str], key: str, value: str, *, add: bool = False) -> None:
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    hits = [i for i, line in enumerate(lines) if pattern.match(line)]
    if not hits and not add:
        raise StackError(f"the rendered rabbitmq.conf has no {key!r} line to rewrite")
    for i in hits:
        lines[i] = f"{key} = {value}"
    if not hits:
        lines.append(f"{key} = {value}")


def local_rabbitmq_conf(
    conf: str,
    *,
    pki: Pki,
    amqps_port: int,
    prometheus_port: int,
    classic_nodes: Sequence[str] = (),
    listen_host: str = "127.0.0.1",
) -> str:
    """The rendered rabbitmq.conf with only the cluster-specific lines rewritten.

    TLS file paths point at `pki`, the TLS listener at `listen_host`:`amqps_port`, the k8s peer
    discovery backend becomes `classic_config` (with `classic_nodes` as its static list, if
    any; the `cluster_formation.k8s.*` keys stay) and the Prometheus listener (default 15692)
    moves to `listen_host`:`prometheus_port` so nodes do not clash.
    """
    lines = conf.splitlines()
    _replace_key(lines, "ssl_options.cacertfile", str(pki.ca_file))
    _replace_key(lines, "ssl_options.certfile", str(pki.server.cert_file))
    _replace_key(lines, "ssl_options.keyfile", str(pki.server.key_file))
    _replace_key(lines, "listeners.ssl.default", f"{listen_host}:{amqps_port}")
    _replace_key(lines, "cluster_formation.peer_discovery_backend", CLASSIC_BACKEND)
    for number, node in enumerate(classic_nodes, start=1):
        _replace_key(lines, f"cluster_formation.classic_config.nodes.{number}", node, add=True)
    _replace_key(lines, "prometheus.tcp.port", str(prometheus_port), add=True)
    _replace_key(lines, "prometheus.tcp.ip", listen_host, add=True)
    lines += future_defaults()  # RabbitMQ 4.x: run with 4.3's defaults where 4.0 allows them
    return "\n".join(lines) + "\n"


@dataclass
class RenderedNode:
    name: str  # Erlang node name, e.g. rendered12345-0@localhost
    folder: Path
    amqps_port: int
    prometheus_port: int
    env: dict[str, str]
    process: Process


class RenderedNodes:
    """What every rig cluster started from the rendered template shares: the template's
    broker parts, the PKI, the Secret's credentials, the RabbitMQ binaries, one login probe and
    one way to run rabbitmqctl against a node."""

    def __init__(self, root: Path, broker: RenderedBroker, pki: Pki, server_hostname: str) -> None:
        self.root = root
        self.broker = broker
        self.pki = pki
        self.server_hostname = server_hostname
        self.server_binary = require("rabbitmq-server", "rabbitmq-server", where=RABBITMQ_SBIN)
        self.ctl_binary = require("rabbitmqctl", "rabbitmq-server", where=RABBITMQ_SBIN)
        self.epmd_binary = require("epmd", "erlang-base")

    @property
    def username(self) -> str:
        return self.broker.env["RABBITMQ_DEFAULT_USER"]

    @property
    def password(self) -> str:
        return self.broker.env["RABBITMQ_DEFAULT_PASS"]

    def login(self, port: int, host: str = "127.0.0.1") -> bool:
        """Whether the Secret's user logs in over TLS with the Route's SNI."""
        return amqps_login(
            port,
            host=host,
            username=self.username,
            password=self.password,
            ca_file=self.pki.ca_file,
            server_hostname=self.server_hostname,
        )

    def rabbitmqctl(
        self,
        node: str,
        args: Sequence[str],
        env: Mapping[str, str],
        *,
        wrap: Callable[[list[str]], list[str]] = list,
        cwd: Path | None = None,
        timeout: float = 60,
    ) -> str:
        """`rabbitmqctl -n NODE ARGS...` with the node's environment (cookie, epmd); stdout.
        `wrap` puts the command where the node runs (e.g. into its network namespace)."""
        result = subprocess.run(
            wrap([self.ctl_binary, "-n", node, *args]),
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            cwd=cwd,
        )
        if result.returncode != 0:
            raise StackError(
                f"rabbitmqctl {' '.join(args)} on {node} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout


class RenderedCluster(RenderedNodes):
    """1..N RabbitMQ nodes from one rendered template, sharing one epmd, under `root`.

    With more than one node, `classic_config` lists all of them (the stand-in for k8s peer
    discovery) and they start together, as the StatefulSet's `podManagementPolicy: Parallel`.
    """

    def __init__(
        self,
        root: Path,
        broker: RenderedBroker,
        pki: Pki,
        *,
        server_hostname: str,
        replicas: int = 1,
    ) -> None:
        super().__init__(root, broker, pki, server_hostname)
        root.mkdir(parents=True, exist_ok=True)
        self.epmd_port = free_port()
        self.epmd = Process(
            "epmd",
            [self.epmd_binary, "-port", str(self.epmd_port)],
            root / "epmd.log",
            env={"ERL_EPMD_PORT": str(self.epmd_port)},
        )
        tag = free_port()
        names = [f"rendered{tag}-{i}@localhost" for i in range(replicas)]
        self.nodes = [self._node(name, names if replicas > 1 else ()) for name in names]

    def _node(self, name: str, peers: Sequence[str]) -> RenderedNode:
        folder = self.root / name.split("@")[0]
        folder.mkdir(parents=True, exist_ok=True)
        amqps_port, prometheus_port = free_port(), free_port()
        conf = self.broker.write_files(
            folder,
            local_rabbitmq_conf(
                self.broker.rabbitmq_conf,
                pki=self.pki,
                amqps_port=amqps_port,
                prometheus_port=prometheus_port,
                classic_nodes=peers,
            ),
        )
        env = {**self.broker.env, **node_env(folder, name, conf, self.epmd_port, free_port())}
        process = Process(name, [self.server_binary], folder / "rabbitmq.log", env=env, cwd=folder)
        return RenderedNode(name, folder, amqps_port, prometheus_port, env, process)

    def ready(self, node: RenderedNode) -> bool:
        return self.login(node.amqps_port)

    def _epmd_listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.epmd_port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self, timeout: float = 120) -> None:
        """Start epmd, then every node together; wait until each accepts the Secret's user."""
        self.epmd.start()
        # A node that finds no epmd would start its own, outside our process group.
        wait_until(self._epmd_listening, self.epmd, 20, "epmd")
        for node in self.nodes:
            node.process.start()
        for node in self.nodes:
            self.wait_ready(node, timeout)

    def wait_ready(self, node: RenderedNode, timeout: float = 120) -> None:
        wait_until(lambda: self.ready(node), node.process, timeout, f"rabbitmq {node.name}")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.process.stop()
        self.epmd.stop()

    def ctl_run(self, node: RenderedNode, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n NODE ARGS...` with the node's environment (cookie, epmd); stdout."""
        return self.rabbitmqctl(node.name, args, node.env, timeout=timeout)


def start_route_router(
    folder: Path,
    route: Mapping[str, Any],
    backend: HostPort,
    pki: Pki,
    port: int | None = None,
) -> tuple[Process, int]:
    """An HAProxy router stand-in for one rendered Route on 127.0.0.1:`port` (free if None)."""
    port = free_port() if port is None else port
    routes = (route_from_manifest(route, backend),)
    return start_router(folder, port, pki.router_default_pem, routes), port
