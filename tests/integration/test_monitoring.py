"""The `monitoring` template against the real thing: Debian's Prometheus and promtool.

- `promtool check rules` and `promtool test rules` (tests/integration/monitoring/alerts-test.yaml,
  one case per alert) on the rendered PrometheusRule;
- a live Prometheus scraping what the rendered PodMonitors name (RabbitMQ's /metrics and
  /metrics/detailed from a node started from the rendered rabbitmq template, the bridge's
  /metrics), evaluating the rendered rules: stopping the workers fires PackitQueueNoConsumer,
  starting them clears it; killing RabbitMQ fires PackitBridgeDisconnected and
  RabbitMQQuorumLost; every dashboard query returns series.

What the live part changes, and only that: the scrape and evaluation intervals (1 s) and the two
`for` parameters of the alerts it waits for (NO_CONSUMER_FOR, BRIDGE_DISCONNECTED_FOR), given as
template parameters; the timing of every `for` is what the promtool cases prove. Targets are
static (no Kubernetes discovery here) and carry the `pod` label the Prometheus Operator adds.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from packit_broker.render import find_objects, load_template, process
from packit_broker.stack import Stack
from packit_broker.stack.processes import Process, free_port
from tests.integration.test_migrate_faults import fill
from tests.integration.test_migrate_follow_faults import Bridge
from tests.integration.test_templates_live import Live, rendered_node
from tests.integration.workers import celery_worker
from tests.unavailable import unavailable

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent / "monitoring"
TROUBLESHOOTING = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} is not installed: apt-get install prometheus (or ./dev bootstrap)")
    return found


def rendered_monitoring(**parameters: str) -> dict[str, Any]:
    return process(load_template("monitoring"), parameters)


def rules_of(rendered: dict[str, Any]) -> dict[str, Any]:
    """The PrometheusRule's groups as a Prometheus rule file."""
    (rule,) = find_objects(rendered, "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def alerts_in(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_queries(rendered: dict[str, Any]) -> list[str]:
    (config_map,) = [
        c
        for c in find_objects(rendered, "ConfigMap")
        if c["metadata"]["name"].endswith("-dashboard")
    ]
    (board,) = [json.loads(text) for text in config_map["data"].values()]
    return [target["expr"] for panel in board["panels"] for target in panel["targets"]]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# -- the rules, offline ----------------------------------------------------------------------


def test_rules_pass_promtool_and_every_alert_has_a_unit_test(tmp_path: Path) -> None:
    promtool = tool("promtool")
    rules = rules_of(rendered_monitoring(REPLICAS="3"))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(HERE / "alerts-test.yaml", tmp_path / "alerts-test.yaml")
    checked = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts-test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = yaml.safe_load((HERE / "alerts-test.yaml").read_text())["tests"]
    firing = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check.get("exp_alerts")
    }
    quiet = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if not check.get("exp_alerts")
    }
    names = {rule["alert"] for rule in alerts_in(rules)}
    assert names == firing, "every alert is shown firing by a case, and only those"
    assert names == quiet, "every alert is shown staying quiet by a case"


def test_every_alert_links_to_its_runbook_section() -> None:
    anchors = github_anchors(TROUBLESHOOTING.read_text())
    for rule in alerts_in(rules_of(rendered_monitoring())):
        url = rule["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base.endswith("docs/troubleshooting.md"), url
        assert anchor == rule["alert"].lower() and anchor in anchors, (
            f"{rule['alert']}: docs/troubleshooting.md needs a heading `## {rule['alert']}`"
        )


# -- live --------------------------------------------------------------------------------------


class Prometheus:
    """Debian's Prometheus on loopback, its config and rules written from the rendered template."""

    def __init__(self, folder: Path, scrape: list[dict[str, Any]], rules: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(folder / "rules.yaml")],
            "scrape_configs": scrape,
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.process = Process(
            "prometheus",
            [
                tool("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            folder / "prometheus.log",
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = json.load(answer)
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        if not self.process.running:
            log = self.process.log.read_text(errors="replace")
            raise AssertionError(f"Prometheus exited:\n{log[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def targets_up(self) -> bool:
        active = self.get("/api/v1/targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def firing(self, alert: str) -> list[dict[str, str]]:
        return [
            a["labels"]
            for a in self.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == alert and a["state"] == "firing"
        ]

    def query(self, expr: str) -> list[Any]:
        return list(self.get("/api/v1/query", query=expr)["result"])


def scrape_configs(
    rendered: dict[str, Any], targets: dict[str, tuple[str, str]]
) -> list[dict[str, Any]]:
    """One scrape job per rendered PodMonitor endpoint, at the rig's address for its pods:
    `targets` maps a PodMonitor's name to (host:port, pod name)."""
    jobs = []
    for monitor in find_objects(rendered, "PodMonitor"):
        address, pod = targets[monitor["metadata"]["name"]]
        for number, endpoint in enumerate(monitor["spec"]["podMetricsEndpoints"]):
            job: dict[str, Any] = {
                "job_name": f"{monitor['metadata']['name']}-{number}",
                "metrics_path": endpoint["path"],
                "static_configs": [{"targets": [address], "labels": {"pod": pod}}],
            }
            if endpoint.get("params"):
                job["params"] = endpoint["params"]
            jobs.append(job)
    return jobs


def not_after(cert_file: Path) -> float:
    """When the leaf certificate of a PEM file expires (Unix time)."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc.timestamp()


def poll(what: Callable[[], Any], timeout: float, doing: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout:.0f} s: {doing}")


@pytest.fixture
def node(stack: Stack, tmp_path: Path) -> Iterator[Live]:
    """A rendered RabbitMQ node behind its router of this test's own, so it may be killed."""
    with rendered_node(stack, tmp_path) as found:
        yield found


def test_live_prometheus_fires_and_clears_the_alerts(
    stack: Stack, node: Live, redis_url: str, tmp_path: Path
) -> None:
    queue = f"monitored-{uuid.uuid4().hex[:6]}"
    rendered = rendered_monitoring(
        WORKER_QUEUES=queue,  # letters, digits and "-": the same as a regular expression
        NO_CONSUMER_FOR="5s",
        BRIDGE_DISCONNECTED_FOR="5s",
    )
    env = {**node.env(), "PACKIT_BROKER_QUEUES": queue}
    bridge = Bridge(env, redis_url, "--batch-size", "50")
    rabbit = node.cluster.nodes[0]
    prometheus = Prometheus(
        tmp_path / "prometheus",
        scrape_configs(
            rendered,
            {
                "packit-broker-rabbitmq": (f"127.0.0.1:{rabbit.prometheus_port}", "rabbitmq-0"),
                "packit-broker-bridge": (f"127.0.0.1:{bridge.port}", "packit-bridge-0"),
            },
        ),
        rules_of(rendered),
    )
    prometheus.process.start()
    try:
        poll(prometheus.ready, 60, "Prometheus ready")
        with celery_worker(env, [queue], tmp_path / "worker.log"):
            fill(redis_url, (queue,), 120)
            poll(lambda: bridge.metric(f'packit_migrate_moved_total{{queue="{queue}"}}') >= 120,
                 60, "the bridge moved the backlog")  # fmt: skip
            poll(prometheus.targets_up, 60, "every scrape target up")
            consuming = f'rabbitmq_detailed_queue_consumers{{queue="{queue}"}} > 0'
            poll(lambda: prometheus.query(consuming), 60, "the worker seen consuming")
            time.sleep(8)  # longer than NO_CONSUMER_FOR: a wrong rule would fire by now
            assert not prometheus.firing("PackitQueueNoConsumer")
            assert not prometheus.firing("PackitBridgeDisconnected")
            (expiry,) = prometheus.query("packit_migrate_certificate_expiry_timestamp_seconds")
            assert float(expiry["value"][1]) == not_after(stack.pki.server.cert_file)
            empty = [q for q in dashboard_queries(rendered) if not prometheus.query(q)]
            assert not empty, f"dashboard queries without data: {empty}"
        began = time.monotonic()
        (fired,) = poll(lambda: prometheus.firing("PackitQueueNoConsumer"), 60,
                        "PackitQueueNoConsumer after the worker stopped")  # fmt: skip
        fired_after = time.monotonic() - began
        assert fired["queue"] == queue
        with celery_worker(env, [queue], tmp_path / "worker-again.log"):
            began = time.monotonic()
            poll(lambda: not prometheus.firing("PackitQueueNoConsumer"), 60,
                 "PackitQueueNoConsumer resolved by a worker again")  # fmt: skip
            cleared_after = time.monotonic() - began
        rabbit.process.kill()
        began = time.monotonic()
        poll(lambda: prometheus.firing("PackitBridgeDisconnected"), 60,
             "PackitBridgeDisconnected after RabbitMQ was killed")  # fmt: skip
        disconnected_after = time.monotonic() - began
        poll(lambda: prometheus.firing("RabbitMQQuorumLost"), 120,
             "RabbitMQQuorumLost with the only node gone")  # fmt: skip
        rabbit.process.start()  # the pod restarted
        node.cluster.wait_ready(rabbit, 120)
        began = time.monotonic()
        for alert in ("PackitBridgeDisconnected", "RabbitMQQuorumLost"):
            poll(lambda alert=alert: not prometheus.firing(alert), 120,
                 f"{alert} resolved with RabbitMQ back")  # fmt: skip
        back_after = time.monotonic() - began
        print(
            f"live alerts: PackitQueueNoConsumer fired {fired_after:.1f} s after the worker"
            f" stopped (for: 5s), cleared {cleared_after:.1f} s after it started;"
            f" PackitBridgeDisconnected fired {disconnected_after:.1f} s after RabbitMQ was"
            f" killed (for: 5s); it and RabbitMQQuorumLost resolved {back_after:.1f} s after"
            " RabbitMQ accepted logins again"
        )
    finally:
        bridge.proc.send_signal(signal.SIGTERM)
        bridge.wait(timeout=30)
        prometheus.process.stop()
