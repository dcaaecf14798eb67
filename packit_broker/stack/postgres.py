"""A fresh PostgreSQL cluster that accepts only TLS with a password (any major version)."""

from __future__ import annotations

import shutil
from pathlib import Path

from packit_broker.stack.certs import Pki
from packit_broker.stack.processes import chown_tree, run_as

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
