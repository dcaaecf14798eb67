"""The image (Containerfile) built here with podman and run as OpenShift's restricted SCC runs
it: an arbitrary UID in group 0, a read-only root filesystem, every capability dropped.

The bridge runs from the *rendered* `bridge` template's container: its command, its
environment (Secrets and the namespace resolved as Kubernetes would), its volume mounts and
its securityContext. Two things are changed, both forced by running outside Kubernetes: the
broker URL is the rig's router address instead of the in-cluster Service name, and the
metrics port is a free one (the host network is shared).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import packit_broker
from packit_broker.render import find_objects, load_template, process
from packit_broker.stack import Stack
from packit_broker.stack.processes import free_port
from tests.integration import backlog
from tests.integration.test_migrate import drain, queue_depth
from tests.integration.test_migrate_follow import Producer, poll
from tests.rig.image import (
    ARBITRARY_UID,
    IMAGE_REPORT,
    RESTRICTED,
    BuiltImage,
    ImageRigError,
    Podman,
    kubernetes_env,
    missing_tools,
    restricted_run_args,
)
from tests.unavailable import unavailable

pytestmark = pytest.mark.integration

TAG = "localhost/packit-broker:test"


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    if missing := missing_tools():
        unavailable(
            f"the image test needs {', '.join(missing)}: apt-get install {' '.join(missing)}"
            " (or ./dev test, which installs them)"
        )
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage]:
    try:
        built = podman.build(tmp_path_factory.mktemp("image"), TAG)
    except ImageRigError as exc:
        pytest.fail(f"the image could not be built: {exc}", pytrace=False)
    IMAGE_REPORT.append(
        f"image {built.tag}: {built.size_bytes / 1e6:.0f} MB; base (debootstrap + import)"
        f" {built.base_seconds:.0f} s, podman build {built.build_seconds:.0f} s"
    )
    yield built
    podman.run("image", "rm", "--force", TAG)


def test_image_runs_as_an_arbitrary_uid_read_only_without_compilers(
    podman: Podman, image: BuiltImage
) -> None:
    config = podman.inspect(image.tag)["Config"]
    assert config["User"] == "1001:0", "not a numeric non-root user in group 0"
    assert config["Entrypoint"] == ["packit-broker"]
    run = ("run", "--rm", *RESTRICTED, "--network=none")
    version = podman.must(*run, image.tag, "--version")
    assert packit_broker.__version__ in version
    probe = podman.run(
        *run, "--tmpfs=/tmp", "--entrypoint=/bin/sh", image.tag, "-c",
        "id -u; id -g; for c in cc gcc g++ make; do command -v $c; done;"
        " touch /opt/packit-broker/x 2>/dev/null && echo writable-opt;"
        " touch /x 2>/dev/null && echo writable-root; touch /tmp/x && echo writable-tmp",
    )  # fmt: skip
    lines = probe.stdout.split()
    assert lines[:2] == [str(ARBITRARY_UID), "0"], probe
    assert lines[2:] == ["writable-tmp"], f"a compiler or a writable path: {probe}"


def _bridge_container(queues: str) -> dict[str, Any]:
    rendered = process(
        load_template("bridge"),
        {"IMAGE": TAG, "REDIS_URL": "redis://unused", "QUEUES": queues},
    )
    (deployment,) = find_objects(rendered, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_the_bridge_from_the_image_moves_every_task_and_reports_on_sigterm(
    podman: Podman,
    image: BuiltImage,
    stack: Stack,
    queue_names: tuple[str, str, str],
    redis_url: str,
    tmp_path: Path,
) -> None:
    container = _bridge_container(",".join(queue_names))
    env = kubernetes_env(
        container,
        secrets={
            ("packit-bridge-redis", "PACKIT_MIGRATE_FROM"): redis_url,
            ("rabbitmq-credentials", "username"): stack.broker_account.username,
            ("rabbitmq-credentials", "password"): stack.broker_account.password,
        },
        fields={"metadata.namespace": "packit-test"},
    )
    assert (
        env["PACKIT_BROKER_URL"].startswith("amqps://")
        and ".packit-test.svc:5671" in (env["PACKIT_BROKER_URL"])
    )
    env.update(stack.broker_env())  # the router, not the in-cluster Service
    env["PACKIT_BROKER_CA_FILE"] = "/etc/packit-broker/ca.crt"  # as mounted from the Secret
    ca_dir, tmp = tmp_path / "broker-ca", tmp_path / "tmp"
    ca_dir.mkdir(mode=0o750)
    (ca_dir / "ca.crt").write_bytes(Path(stack.pki.ca_file).read_bytes())
    tmp.mkdir(mode=0o770)  # the emptyDir: writable by group 0 only, as the UID is arbitrary
    os.chmod(tmp, 0o770)
    command = list(container["command"])
    port = free_port()
    command[command.index("--metrics-port") + 1] = str(port)
    name = f"bridge-{uuid.uuid4().hex[:8]}"
    args = restricted_run_args(container, {"/etc/packit-broker": ca_dir, "/tmp": tmp}, sorted(env))
    app = backlog.producer(redis_url, queue_names)
    queued = [backlog.send(app, q, f"{q}:{n}") for n in range(100) for q in queue_names]
    bridge = podman.popen(
        "run", "--rm", f"--name={name}", *args, f"--entrypoint={command[0]}", image.tag,
        *command[1:], env=env,
    )  # fmt: skip
    live = Producer(redis_url, queue_names, rate=50)
    try:
        poll(lambda: _ready(port), 60, "serving /metrics (the readiness probe)")
        argv = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        live.start()
        time.sleep(5)
        sent = queued + [s[3] for s in live.stop()]
        poll(lambda: sum(queue_depth(stack, q) for q in queue_names) >= len(sent), 60, "moved")
        podman.must("kill", f"--signal={signal.SIGTERM.name}", name)
        bridge.wait(timeout=60)
    finally:
        if live.is_alive():
            live.stop()
        if bridge.poll() is None:
            podman.run("kill", name)
    stdout, stderr = bridge.communicate()
    assert bridge.returncode == 0, stderr
    report = json.loads((tmp / "bridge-report.json").read_text())
    delivered = [m.headers["id"] for q in queue_names for m in drain(stack, q)]
    assert sorted(delivered) == sorted(sent), "lost or duplicated"
    assert report["complete"] is True and sum(report["migrated"].values()) == len(sent)
    client = redis.Redis.from_url(redis_url)
    assert [k for k in client.keys("*") if client.type(k) == b"list"] == [], "left in Redis"
    assert stack.broker_account.password not in argv + stdout + stderr


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_check_from_the_image_passes_through_the_router(
    podman: Podman, image: BuiltImage, stack: Stack, tmp_path: Path
) -> None:
    env = {**stack.broker_env(), "PACKIT_BROKER_CA_FILE": "/etc/packit-broker/ca.crt"}
    ca_dir = tmp_path / "broker-ca"
    ca_dir.mkdir(mode=0o750)
    (ca_dir / "ca.crt").write_bytes(Path(stack.pki.ca_file).read_bytes())
    done = podman.run(
        "run", "--rm", *RESTRICTED, "--network=host",
        f"--volume={ca_dir}:/etc/packit-broker:ro", *(f"--env={n}" for n in sorted(env)),
        image.tag, "check", env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert stack.broker_account.password not in done.stdout + done.stderr
