"""How a local RabbitMQ node is started and probed; shared by the stack and the template tests."""

from __future__ import annotations

import contextlib
import ssl
from pathlib import Path

#: Debian's real scripts; /usr/sbin/rabbitmq-server would `su` to the rabbitmq user.
RABBITMQ_SBIN = ("/usr/lib/rabbitmq/bin",)
#: RabbitMQ 4.3's default, switchable from 4.0 on: transient non-exclusive queues are refused.
#: The rig runs 4.x with it, so that Celery's control and event queues are tested against it.
FUTURE_DEFAULTS_FROM = (4, 0, 0)
FUTURE_DEFAULTS = ("deprecated_features.permit.transient_nonexcl_queues = false",)


def installed_version() -> tuple[int, ...] | None:
    """The version of the RabbitMQ server installed here (from its install folder)."""
    import glob
    import re

    for folder in sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*")):
        found = re.search(r"rabbitmq_server-(\d+)\.(\d+)\.(\d+)", folder)
        if found:
            return tuple(int(part) for part in found.groups())
    return None


def future_defaults() -> list[str]:
    """rabbitmq.conf lines that switch on the next releases' defaults, where this one can."""
    version = installed_version()
    return list(FUTURE_DEFAULTS) if version is not None and version >= FUTURE_DEFAULTS_FROM else []


def node_env(
    folder: Path, nodename: str, conf: Path, epmd_port: int, dist_port: int
) -> dict[str, str]:
    """Environment that keeps every file, port and the cookie of one node under `folder`."""
    return {
        "HOME": str(folder),
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_NODENAME": nodename,
        "RABBITMQ_CONFIG_FILE": str(conf),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_PID_FILE": str(folder / "rabbit.pid"),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
    }


def amqps_login(
    port: int,
    *,
    username: str,
    password: str,
    ca_file: Path,
    server_hostname: str,
    host: str = "127.0.0.1",
    timeout: float = 2.0,
) -> bool:
    """Whether an AMQP 0-9-1 login over TLS (with SNI) to `host`:`port` succeeds in time."""
    import amqp

    connection = amqp.Connection(
        f"{host}:{port}",
        userid=username,
        password=password,
        ssl={
            "ca_certs": str(ca_file),
            "server_hostname": server_hostname,
            "cert_reqs": ssl.CERT_REQUIRED,
        },
        connect_timeout=timeout,
    )
    try:
        connection.connect()
    except Exception:
        return False
    with contextlib.suppress(Exception):
        connection.close()
    return True
