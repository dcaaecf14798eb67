"""The image rig: podman on this machine, the Containerfile built on a debootstrap base, and a
rendered template's container run under what OpenShift's restricted SCC enforces.

No registry is reachable here, so the base image is made by `scripts/image-base.sh` (a
minimal Debian root of this machine's release, `podman import`ed). podman gets a
`containers.conf` of its own (runc, cgroupfs, no default ulimits: what this kind of machine
needs) through `CONTAINERS_CONF`, so the machine's own settings are neither needed nor touched.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

#: What OpenShift's restricted(-v2) SCC runs a pod as: a UID from the namespace's range (this is
#: the first of a typical range), group 0, no capabilities, no privilege escalation.
ARBITRARY_UID = 1000770000
RESTRICTED = (
    f"--user={ARBITRARY_UID}:0",
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
)

CONTAINERS_CONF = """\
[containers]
default_ulimits = []
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""

#: Filled by the image test's fixture; printed in the terminal summary (image size, build time).
IMAGE_REPORT: list[str] = []

_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


class ImageRigError(RuntimeError):
    """podman, debootstrap or the build failed; the message says which and shows its output."""


def missing_tools() -> list[str]:
    """The Debian packages the image rig needs that this machine lacks."""
    needed = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}
    return [pkg for tool, pkg in needed.items() if shutil.which(tool) is None]


@dataclass(frozen=True)
class BuiltImage:
    """The image the Containerfile made, and what it took."""

    tag: str
    size_bytes: int
    base_seconds: float
    build_seconds: float


class Podman:
    """podman with a configuration of the rig's own, in a folder of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """`podman ARGS`, its output captured; never raises for an exit code."""
        return subprocess.run(
            ["podman", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def must(self, *args: str, timeout: float = 600) -> str:
        """`podman ARGS`, which must succeed; its stdout."""
        done = self.run(*args, timeout=timeout)
        if done.returncode != 0:
            raise ImageRigError(
                f"podman {' '.join(args[:2])} exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done.stdout

    def popen(self, *args: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
        """`podman ARGS` in the background, with `env` added to podman's own environment."""
        return subprocess.Popen(
            ["podman", *args],
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def build(self, work: Path, tag: str) -> BuiltImage:
        """The base from debootstrap, the wheel from this checkout, then the Containerfile."""
        started = time.monotonic()
        base = subprocess.run(
            ["bash", str(REPO / "scripts" / "image-base.sh")],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if base.returncode != 0:
            raise ImageRigError(f"scripts/image-base.sh failed:\n{base.stderr[-3000:]}")
        base_tag = base.stdout.strip().splitlines()[-1]
        base_seconds = time.monotonic() - started
        context = work / "context"
        shutil.rmtree(context, ignore_errors=True)
        wheel = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
             str(context / "dist"), str(REPO)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if wheel.returncode != 0:
            raise ImageRigError(f"pip wheel of the checkout failed:\n{wheel.stderr[-3000:]}")
        started = time.monotonic()
        self.must(
            "build", "--quiet", "--network=host", *_own_ulimits(),
            "--file", str(REPO / "Containerfile"),
            "--ignorefile", str(REPO / ".containerignore"),
            "--build-arg", f"BASE={base_tag}", "--tag", tag, str(context),
        )  # fmt: skip
        build_seconds = time.monotonic() - started
        size = int(self.must("image", "inspect", "--format", "{{.Size}}", tag).strip())
        return BuiltImage(tag, size, base_seconds, build_seconds)

    def inspect(self, tag: str) -> dict[str, Any]:
        """`podman image inspect` of `tag`."""
        found = json.loads(self.must("image", "inspect", tag))
        assert isinstance(found, list) and len(found) == 1
        return dict(found[0])


def _own_ulimits() -> list[str]:
    """`--ulimit` options that keep the build's RUN steps at this process's own limits.

    podman 5's builder raises RUN steps' open-file and process limits above what it was given,
    which a sandboxed machine (this kind, and CI's roots) refuses with EPERM; podman run does
    not (containers.conf's `default_ulimits = []`)."""
    options = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = resource.getrlimit(which)
        shown = ["-1" if v == resource.RLIM_INFINITY else str(v) for v in (soft, hard)]
        options.append(f"--ulimit={name}={shown[0]}:{shown[1]}")
    return options


def kubernetes_env(
    container: Mapping[str, Any],
    secrets: Mapping[tuple[str, str], str],
    fields: Mapping[str, str],
) -> dict[str, str]:
    """The environment Kubernetes gives `container`: secretKeyRef and fieldRef resolved from
    `secrets` ((name, key) -> value) and `fields`, `$(VAR)` expanded from earlier entries."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        name = entry["name"]
        if "value" in entry:
            env[name] = _REF.sub(lambda m: env.get(m.group(1), m.group(0)), str(entry["value"]))
            continue
        source = entry["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secrets[(ref["name"], ref["key"])]
        elif "fieldRef" in source:
            env[name] = fields[source["fieldRef"]["fieldPath"]]
        else:
            raise ImageRigError(f"env {name}: the rig cannot resolve {source}")
    return env


def restricted_run_args(
    container: Mapping[str, Any], mounts: Mapping[str, Path], env_names: Sequence[str]
) -> list[str]:
    """`podman run` options for `container` as the restricted SCC and its spec run it.

    The container's securityContext must ask for what the flags enforce (so a template that
    dropped readOnlyRootFilesystem or the capability drop fails here, not in production);
    `mounts` maps each volumeMount's path to a host folder or file; environment values stay
    out of argv (`-e NAME` passes podman's own)."""
    context = container.get("securityContext", {})
    if context.get("readOnlyRootFilesystem") is not True:
        raise ImageRigError("the container does not set readOnlyRootFilesystem: true")
    if context.get("allowPrivilegeEscalation") is not False:
        raise ImageRigError("the container does not set allowPrivilegeEscalation: false")
    if context.get("capabilities", {}).get("drop") != ["ALL"]:
        raise ImageRigError("the container does not drop ALL capabilities")
    args = [*RESTRICTED, "--network=host"]
    for mount in container.get("volumeMounts", []):
        path = mount["mountPath"]
        if path not in mounts:
            raise ImageRigError(f"no host folder given for the volumeMount {path}")
        mode = "ro" if mount.get("readOnly") else "rw"
        args.append(f"--volume={mounts[path]}:{path}:{mode}")
    for name in env_names:
        args.append(f"--env={name}")
    return args
