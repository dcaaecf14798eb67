"""Three RabbitMQ "hosts" from the rendered template: one network namespace per node.

What a StatefulSet with `REPLICAS=3` gives, on one machine:
- each node runs in its own network namespace with its own address on a private bridge (a veth
  pair per host), its own epmd on 4369, distribution on 25672 and AMQPS on 5671, as a Pod does;
- the addresses come from a documentation range (RFC 5737 TEST-NET-2/-3) that overlaps no route
  or address of this machine, on a bridge that exists only while the rig runs: no packet can
  leave the machine;
- every node is started from the *rendered* ConfigMap and Secret (see `tests.rig.rendered`);
  only the k8s peer discovery becomes a static list of the three hosts, plus file paths;
- the router stand-in (HAProxy, root namespace, 127.0.0.1) sends the Route's SNI to all three
  with `balance source` and health checks, as the OpenShift router does for a passthrough Route.

Fault controls: `kill` (SIGKILL), `stop_gracefully` (the template's preStop hook, then SIGTERM as
the kubelet does), `cut`/`heal` (the host's link down/up: packets silently dropped, TCP
sessions stay half-open), `start_node`. Everything (namespaces, links, processes) is removed by
`stop()`, and namespaces left by a rig that was itself killed are swept on the next start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from packit_broker.config import HostPort
from packit_broker.router import PassthroughRoute, route_from_manifest, server_name
from packit_broker.stack.certs import Pki
from packit_broker.stack.processes import Process, StackError, free_port, require, wait_until
from packit_broker.stack.rabbitmq import RABBITMQ_SBIN, node_env
from packit_broker.stack.router_process import runtime_command, start_router
from tests.rig.rendered import RenderedBroker, RenderedNodes, local_rabbitmq_conf

PREFIX = "pkbc"  # names of our namespaces and links: pkbc<pid>...
AMQPS_PORT = 5671
EPMD_PORT = 4369
DIST_PORT = 25672
PROMETHEUS_PORT = 15692
#: RFC 5737 documentation ranges: never routed anywhere, so safe for a private bridge.
CANDIDATE_NETWORKS = ("198.51.100.0/24", "203.0.113.0/24")
#: A Pod that dies or is being deleted leaves the Service's endpoints (kubelet -> endpoints
#: controller -> router reload; the OpenShift router reloads at most every RELOAD_INTERVAL,
#: 5 s): the router stops sending new connections to it after about this long, before its
#: health checks (3 x 5 s) would notice. A network cut changes no endpoint: only the health
#: checks take a cut-off pod out.
ENDPOINTS_DELAY = 5.0


def _ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(
        [require("ip", "iproute2"), *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise StackError(
            f"ip {' '.join(args)} failed: {result.stderr.strip()}; the cluster rig needs root"
            " (CAP_NET_ADMIN) to create network namespaces"
        )
    return result.stdout


def _tail(path: Path, lines: int = 25) -> str:
    """The end of a node's log, for a failure message (empty if there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address in or a route to (except `default`)."""
    used: list[ipaddress.IPv4Network] = []
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = str(route.get("dst", "default"))
        if dst != "default":
            used.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(_ip("-j", "-4", "addr") or "[]"):
        for addr in link.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return used


def pick_network(used: Sequence[ipaddress.IPv4Network], prefix: int = 28) -> ipaddress.IPv4Network:
    """The first /`prefix` of the documentation ranges that overlaps none of `used`.

    (The machine's own uplink may well sit in a documentation range: 192.0.2.0/24, TEST-NET-1,
    is not even a candidate for that reason.)
    """
    for candidate in CANDIDATE_NETWORKS:
        for subnet in ipaddress.IPv4Network(candidate).subnets(new_prefix=prefix):
            if not any(subnet.overlaps(net) for net in used):
                return subnet
    raise StackError(f"no free {CANDIDATE_NETWORKS} subnet: remove stale {PREFIX}* bridges")


def free_test_network(prefix: int = 28) -> ipaddress.IPv4Network:
    """A /`prefix` of a documentation range that overlaps nothing this machine uses."""
    return pick_network(_networks_in_use(), prefix)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Remove namespaces and bridges of rigs whose process no longer exists."""
    owners: set[int] = set()
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX) and "-" in name:
            owners.add(int(name[len(PREFIX) :].split("-")[0]))
    for link in json.loads(_ip("-j", "link") or "[]"):
        name = str(link.get("ifname", ""))
        if name.startswith(PREFIX) and name.endswith("br") and name[len(PREFIX) : -2].isdigit():
            owners.add(int(name[len(PREFIX) : -2]))
    for pid in owners:
        if not _pid_alive(pid):
            _remove_network(pid)


def _remove_network(pid: int) -> None:
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{PREFIX}{pid}-"):
            _ip("netns", "del", name, check=False)
    _ip("link", "del", f"{PREFIX}{pid}br", check=False)


@dataclass
class Host:
    """One "Pod": a namespace, its address, its epmd and its RabbitMQ node."""

    index: int
    netns: str
    veth: str  # the root-namespace end of the host's link (down = cut off)
    address: str
    folder: Path
    env: dict[str, str]
    epmd: Process
    server: Process

    @property
    def node(self) -> str:
        return f"rabbit@{self.address}"

    @property
    def amqps(self) -> HostPort:
        return HostPort(self.address, AMQPS_PORT)


class NamespaceCluster(RenderedNodes):
    """`replicas` RabbitMQ nodes, each on its own network namespace, plus the Route's router."""

    def __init__(
        self,
        root: Path,
        broker: RenderedBroker,
        pki: Pki,
        *,
        server_hostname: str,
        replicas: int = 3,
    ) -> None:
        super().__init__(root, broker, pki, server_hostname)
        self.ip = require("ip", "iproute2")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self.network: ipaddress.IPv4Network | None = None
        self.replicas = replicas
        self.hosts: list[Host] = []
        self.router: Process | None = None
        self.route: PassthroughRoute | None = None
        self.router_port = 0
        self._timers: list[threading.Timer] = []
        self.started_in = 0.0

    # -- network ----------------------------------------------------------------------------

    def _create_network(self) -> None:
        sweep_stale()
        self.network = free_test_network()
        addresses = list(self.network.hosts())
        gateway = addresses[0]
        prefix = self.network.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{gateway}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        names = [str(addresses[1 + i]) for i in range(self.replicas)]
        for index, address in enumerate(names):
            netns = f"{self.tag}-{index}"
            veth = f"{self.tag}v{index}"
            _ip("netns", "add", netns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", netns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "link", "set", "eth0", "up")
            self.hosts.append(self._host(index, netns, veth, address, names))

    def _in_netns(self, netns: str, argv: Sequence[str]) -> list[str]:
        return [self.ip, "netns", "exec", netns, *argv]

    def _host(self, index: int, netns: str, veth: str, address: str, peers: Sequence[str]) -> Host:
        folder = self.root / f"host{index}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = self.broker.write_files(
            folder,
            local_rabbitmq_conf(
                self.broker.rabbitmq_conf,
                pki=self.pki,
                amqps_port=AMQPS_PORT,
                prometheus_port=PROMETHEUS_PORT,
                classic_nodes=[f"rabbit@{peer}" for peer in peers],
                listen_host=address,
            ),
        )
        env = {
            **self.broker.plain_env,  # RABBITMQ_USE_LONGNAME, RABBITMQ_REPLICAS, ...
            **self.broker.env,  # the Secret's credentials
            **node_env(folder, f"rabbit@{address}", conf, EPMD_PORT, DIST_PORT),
            "PATH": f"{RABBITMQ_SBIN[0]}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        epmd = Process(
            f"epmd-{index}",
            self._in_netns(netns, [self.epmd_binary, "-port", str(EPMD_PORT)]),
            folder / "epmd.log",
        )
        server = Process(
            f"rabbit@{address}",
            self._in_netns(netns, [self.server_binary]),
            folder / "rabbitmq.log",
            env=env,
            cwd=folder,
        )
        return Host(index, netns, veth, address, folder, env, epmd, server)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> NamespaceCluster:
        """Network, epmd and nodes (together, as `podManagementPolicy: Parallel`), router."""
        started = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._create_network()
            for host in self.hosts:
                host.epmd.start()
            for host in self.hosts:
                self._wait_epmd(host)
            for host in self.hosts:
                host.server.start()
            for host in self.hosts:
                self.wait_ready(host, timeout)
            self.wait_clustered(timeout)
            self._start_router()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - started
        return self

    def _wait_epmd(self, host: Host) -> None:
        # A node that finds no epmd would start its own, outside our process group.
        wait_until(lambda: self._epmd_up(host), host.epmd, 20, f"epmd on {host.netns}")

    def _epmd_up(self, host: Host) -> bool:
        try:
            with socket.create_connection((host.address, EPMD_PORT), timeout=0.5):
                return True
        except OSError:
            return False

    def _start_router(self) -> None:
        first, *others = self.hosts
        route = route_from_manifest(
            self.broker.route, first.amqps, tuple(host.amqps for host in others)
        )
        self.route = route
        self.router_port = free_port()
        self.router = start_router(
            self.router_folder,
            self.router_port,
            self.pki.router_default_pem,
            (route,),
            admin=True,
        )

    def use_route(self, manifest: Mapping[str, object]) -> None:
        """Serve another Route manifest, as after `oc apply` of a changed Route (the router
        restarts with it, on a new port: clients need `router_port` again)."""
        if self.router is not None:
            self.router.stop()
        self.broker = replace(self.broker, route=manifest)
        self._start_router()

    @property
    def router_folder(self) -> Path:
        return Path(f"/tmp/{self.tag}-router")  # short: the unix socket path limit

    def set_endpoint(self, host: Host, ready: bool) -> None:
        """Put the host's pod into (ready) or out of (maint) the router's backend now."""
        if self.router is None or self.route is None or not self.router.running:
            return
        state = "ready" if ready else "maint"
        runtime_command(
            self.router_folder, f"set server {server_name(self.route, host.index)} state {state}"
        )

    def _leave_endpoints(self, host: Host) -> None:
        timer = threading.Timer(ENDPOINTS_DELAY, self.set_endpoint, (host, False))
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def endpoint_states(self) -> dict[str, str]:
        """Each pod's state in the router: UP, DOWN (health check), MAINT (not an endpoint)."""
        if self.router is None or self.route is None:
            return {}
        out = runtime_command(self.router_folder, "show servers state")
        states: dict[str, str] = {}
        for host in self.hosts:
            backend, server = server_name(self.route, host.index).split("/")
            for line in out.splitlines():
                fields = line.split()
                if len(fields) > 6 and fields[1] == backend and fields[3] == server:
                    admin = int(fields[6])
                    operational = int(fields[5])
                    states[host.node] = (
                        "MAINT" if admin & 1 else ("UP" if operational == 2 else "DOWN")
                    )
        return states

    def ready(self, host: Host) -> bool:
        return self.login(AMQPS_PORT, host.address)

    def wait_ready(self, host: Host, timeout: float = 90) -> None:
        wait_until(lambda: self.ready(host), host.server, timeout, f"rabbitmq {host.node}")

    def running_nodes(self, host: Host) -> set[str]:
        """The nodes `host` sees running (empty if it cannot tell); RabbitMQ 3.10 to 4.x."""
        try:
            out = self.ctl(host, "cluster_status", "--formatter", "json", timeout=20)
            return {str(node) for node in json.loads(out).get("running_nodes", [])}
        except (StackError, subprocess.TimeoutExpired, ValueError):
            return set()

    def wait_clustered(self, timeout: float = 90) -> None:
        """Until every running node sees all the others running."""
        everyone = {h.node for h in self.hosts}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.running_nodes(h) == everyone for h in self.hosts):
                return
            time.sleep(1)
        views = {h.node: sorted(self.running_nodes(h)) for h in self.hosts}
        tails = "".join(
            f"\n--- {h.node}: the end of its log ---\n{_tail(h.folder / 'log' / f'{h.node}.log')}"
            for h in self.hosts
            if set(views[h.node]) != everyone
        )
        raise StackError(f"the cluster did not form within {timeout:.0f}s: {views}{tails}")

    def stop(self) -> None:
        """Router, nodes, epmds, then namespaces and the bridge: nothing is left behind."""
        for timer in self._timers:
            timer.cancel()
        if self.router is not None:
            self.router.stop()
            self.router = None
            shutil.rmtree(self.router_folder, ignore_errors=True)
        for host in self.hosts:
            host.server.stop(timeout=15)
            host.epmd.stop()
        _remove_network(os.getpid())
        self.hosts = []

    # -- fault controls ---------------------------------------------------------------------

    def kill(self, host: Host) -> None:
        """SIGKILL the node (OOM kill, a crash); its pod leaves the endpoints shortly after."""
        host.server.kill()
        self._leave_endpoints(host)

    def stop_gracefully(self, host: Host, timeout: float = 120) -> bool:
        """What the kubelet does: the template's preStop hook, then SIGTERM and wait.

        The pod, terminating, leaves the Service's endpoints at the same time. Returns whether
        the node was in maintenance mode (drained) when SIGTERM came; the hook's output is in
        `host.folder/pre-stop.log`.
        """
        self._leave_endpoints(host)
        drained = False
        if self.broker.pre_stop:
            hook = subprocess.run(
                self._in_netns(host.netns, self.broker.pre_stop),
                env={**os.environ, **host.env},
                capture_output=True,
                text=True,
                check=False,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                cwd=host.folder,
            )
            with (host.folder / "pre-stop.log").open("a") as log:
                log.write(hook.stdout + hook.stderr)
            drained = self.is_drained(host)
        host.server.stop(timeout=timeout)
        return drained

    def is_drained(self, host: Host) -> bool:
        """Whether the node is in maintenance mode (`rabbitmq-upgrade drain`)."""
        answer = self.ctl(host, "eval", "rabbit_maintenance:is_being_drained_local_read(node()).")
        return answer.strip() == "true"

    def start_node(self, host: Host, timeout: float = 90) -> None:
        """Start the node; once it accepts logins (readiness), it is an endpoint again."""
        for timer in self._timers:
            timer.join()  # an earlier removal must not land after this return
        host.server.start()
        self.wait_ready(host, timeout)
        self.set_endpoint(host, True)

    def cut(self, host: Host) -> None:
        """Take the host off the network: its link goes down, packets are silently dropped."""
        _ip("link", "set", host.veth, "down")

    def heal(self, host: Host) -> None:
        _ip("link", "set", host.veth, "up")

    # -- inspection -------------------------------------------------------------------------

    def ctl(self, host: Host, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n NODE ARGS...` run on the node's own host; stdout."""
        return self.rabbitmqctl(
            host.node,
            args,
            host.env,
            wrap=lambda argv: self._in_netns(host.netns, argv),
            cwd=host.folder,
            timeout=timeout,
        )

    def connections_per_node(self) -> dict[str, int]:
        """Client connections each pod holds, as the router sees them (its current sessions
        per server): what `balance source` decided, and the same on every RabbitMQ version
        (asking RabbitMQ through `rabbit_networking:connections()` miscounted on 4.0)."""
        if self.router is None or self.route is None:
            return {}
        rows = runtime_command(self.router_folder, "show stat").splitlines()
        header = rows[0].lstrip("# ").split(",") if rows else []
        scur = header.index("scur") if "scur" in header else 4
        counts: dict[str, int] = {}
        for host in self.hosts:
            backend, server = server_name(self.route, host.index).split("/")
            for row in rows[1:]:
                fields = row.split(",")
                if len(fields) > scur and fields[0] == backend and fields[1] == server:
                    counts[host.node] = int(fields[scur] or 0)
        return counts

    def serving(self, marker: str) -> list[Host]:
        """The hosts whose node serves a client connection named with `marker` (its
        `connection_name` client property), as RabbitMQ itself reports it: the server address
        each connection arrived on. Unlike the router's session counts, this names the node a
        given client is on, whatever other clients left behind."""
        up = next(h for h in self.hosts if h.server.running)
        out = self.ctl(
            up, "--quiet", "list_connections", "host", "client_properties", "--formatter", "json"
        )
        by_address = {h.address: h for h in self.hosts}
        found: list[Host] = []
        for connection in json.loads(out or "[]"):
            if marker in json.dumps(connection.get("client_properties")):
                address = connection.get("host")  # 3.10: [198, 51, 100, 3]; 4.x: a string
                if isinstance(address, list):
                    address = ".".join(map(str, address))
                host = by_address.get(str(address))
                if host is not None and host not in found:
                    found.append(host)
        return found

    def host_of(self, node: str) -> Host:
        return next(h for h in self.hosts if h.node == node)

    def others(self, host: Host) -> list[Host]:
        return [h for h in self.hosts if h is not host]

    def server_version(self) -> tuple[int, ...]:
        out = self.ctl(self.hosts[0], "version")
        return tuple(int(part) for part in out.strip().split("+")[0].split(".")[:3])


@contextlib.contextmanager
def namespace_cluster(
    root: Path, broker: RenderedBroker, pki: Pki, *, server_hostname: str
) -> Iterator[NamespaceCluster]:
    """A started cluster, removed afterwards whatever happens."""
    cluster = NamespaceCluster(root, broker, pki, server_hostname=server_hostname)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
