"""The release as a user gets it: sdist and wheel built from the checkout, installed into a
fresh virtualenv outside it, and every command run from there (not from the source tree)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import packit_broker
from packit_broker.render import bundled_templates, load_template
from packit_broker.stack import Stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

#: Values for each template's required parameters that have no default.
SAMPLE_VALUES = {
    "IMAGE": "quay.io/example/packit-broker:1.0",
    "REDIS_URL": "redis://:secret@redis:6379/0",
    "ROUTE_HOST": "amqp.apps.example.com",
    "BROKER_URL": "amqps://packit:secret@amqp.apps.example.com:443/",
}


@dataclass(frozen=True)
class Release:
    """The built distributions and a virtualenv (outside the checkout) to install them in."""

    sdist: Path
    wheel: Path
    venv: Path
    cwd: Path

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """A command of the virtualenv, run from a folder outside the checkout."""
        clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]],
            cwd=self.cwd,
            env={**clean, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    work = tmp_path_factory.mktemp("release")
    dist = work / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = dist.glob("packit_broker-*.tar.gz")
    (wheel,) = dist.glob("packit_broker-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    cwd = work / "elsewhere"
    cwd.mkdir()
    yield Release(sdist, wheel, venv, cwd)


def _install(release: Release, spec: str) -> None:
    done = release.run("python", "-m", "pip", "install", "-q", spec, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_distributions_carry_the_package_data_and_the_license(release: Release) -> None:
    version = packit_broker.__version__
    assert release.wheel.name.startswith(f"packit_broker-{version}-")
    with zipfile.ZipFile(release.wheel) as wheel:
        names = set(wheel.namelist())
    for template in bundled_templates():
        assert f"packit_broker/manifests/{template}.yaml" in names
    assert "packit_broker/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith("LICENSE") for n in names)
    with tarfile.open(release.sdist) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml", "Containerfile"} <= members


def test_a_plain_install_runs_every_command_but_the_demo(release: Release, stack: Stack) -> None:
    _install(release, str(release.wheel))
    version = release.run("packit-broker", "--version")
    assert version.returncode == 0 and packit_broker.__version__ in version.stdout
    assert release.run("packit-broker", "--help").returncode == 0
    for name in bundled_templates():
        params = [f"{p}={v}" for p, v in _required(name, stack).items()]
        done = release.run("packit-broker", "render", name, *(f"-p{p}" for p in params))
        assert done.returncode == 0, f"render {name}: {done.stderr}"
        assert yaml.safe_load(done.stdout)["kind"] == "List"
    check = release.run("packit-broker", "check", env=stack.broker_env(), timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    demo = release.run("packit-broker", "demo")
    assert demo.returncode != 0
    lines = demo.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'packit-broker[demo]'" in lines[0], demo.stderr


def test_the_demo_runs_from_an_install_with_the_demo_extra(release: Release) -> None:
    _install(release, f"{release.wheel}[demo]")
    demo = release.run("packit-broker", "demo", timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]


def _required(name: str, stack: Stack) -> dict[str, str]:
    """A value for every required parameter of template `name` that has no default."""
    values = {**SAMPLE_VALUES, "CA_CERT": Path(stack.pki.ca_file).read_text()}
    needed = {}
    for param in load_template(name).get("parameters", []):
        if param.get("required") and not param.get("value") and not param.get("generate"):
            assert param["name"] in values, f"no sample value for {name}'s {param['name']}"
            needed[param["name"]] = values[param["name"]]
    return needed
