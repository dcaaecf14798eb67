"""A PostgreSQL *older than 17* with TLS, for tests of what clients see when direct TLS is missing.

Debian 12 ships PostgreSQL 15 (`apt-get install postgresql-15`, binaries under
/usr/lib/postgresql/15/bin). It does TLS only after the classic plaintext SSLRequest: a direct
TLS ClientHello (libpq 17's `sslnegotiation=direct`, the only kind a passthrough Route can
route) is read as a startup packet of absurd length and the connection is closed. This module
starts one like `Stack.start_postgres` starts PostgreSQL 17 (initdb as the unprivileged service
user, ssl = on with the stack's server certificate, `hostssl` + scram-sha-256 only), on a free
loopback port under its own temp folder. Test-only: the package is not a runtime dependency.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from packit_broker.stack.certs import Pki
from packit_broker.stack.processes import (
    Process,
    StackError,
    chown_tree,
    free_port,
    service_user,
    wait_until,
)

LEGACY_MAJOR = 15
LEGACY_PACKAGE = f"postgresql-{LEGACY_MAJOR}"
LEGACY_BINDIR = Path(f"/usr/lib/postgresql/{LEGACY_MAJOR}/bin")


def legacy_binary(name: str, bindir: Path = LEGACY_BINDIR) -> str:
    """`bindir/name`, or a StackError naming the Debian package (never another PATH version)."""
    path = bindir / name
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    raise StackError(
        f"{path} not found: install {LEGACY_PACKAGE} (on Debian 12: `apt-get install"
        f" {LEGACY_PACKAGE}`, or run scripts/bootstrap.sh; a test-only server, its system"
        " service is not needed)"
    )


def _run_as(owner: tuple[int, int] | None, argv: list[str], log: Path) -> None:
    def demote() -> None:
        if owner is not None:
            os.setgid(owner[1])
            os.setgroups([])
            os.setuid(owner[0])

    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=demote if owner is not None else None,
        stdin=subprocess.DEVNULL,
        cwd="/",
    )
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise StackError(
            f"{Path(argv[0]).name} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class LegacyPostgres:
    """PostgreSQL 15 with TLS (classic SSLRequest negotiation only) on 127.0.0.1:`port`.

    `pki.server` must cover `server_hostname` (the stack's covers `stack.postgres_host`).
    Use as a context manager, or `start()` ... `stop()`; `stop()` removes the temp folder.
    """

    def __init__(
        self,
        pki: Pki,
        server_hostname: str,
        *,
        username: str = "packit",
        password: str | None = None,
        bindir: Path = LEGACY_BINDIR,
    ) -> None:
        self.pki = pki
        self.server_hostname = server_hostname
        self.username = username
        self.password = secrets.token_urlsafe(12) if password is None else password
        self.initdb = legacy_binary("initdb", bindir)
        self.postgres = legacy_binary("postgres", bindir)
        self.port = free_port()
        self.root: Path | None = None
        self.process: Process | None = None

    def __repr__(self) -> str:
        return f"LegacyPostgres(port={self.port}, root={self.root}, password=***)"

    def __enter__(self) -> LegacyPostgres:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> LegacyPostgres:
        if self.process is not None and self.process.running:
            return self
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="packit-pg15-"))  # short: unix socket path
        self.root.chmod(0o711)  # the unprivileged server must traverse it
        owner = service_user()
        data = self.root / "data"
        self._init(data, owner)
        self.process = Process(
            "postgres-15", [self.postgres, "-D", str(data)], self.root / "postgres.log", user=owner
        )
        self.process.start()
        wait_until(
            lambda: (data / "postmaster.pid").exists() and _tcp_open(self.port),
            self.process,
            timeout,
            f"postgres {LEGACY_MAJOR}",
        )
        wait_until(self._accepts_classic_tls, self.process, timeout, "postgres 15 (classic TLS)")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _init(self, data: Path, owner: tuple[int, int] | None) -> None:
        folder = self.root
        assert folder is not None
        pwfile = folder / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        shutil.copy(self.pki.server.cert_file, folder / "server.crt")
        shutil.copy(self.pki.server.key_file, folder / "server.key")
        shutil.copy(self.pki.ca_file, folder / "ca.crt")
        (folder / "server.key").chmod(0o600)
        chown_tree(folder, owner)
        _run_as(
            owner,
            [
                self.initdb,
                "-D",
                str(data),
                "-U",
                self.username,
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
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{folder}'\nssl = on\n"
                f"ssl_cert_file = '{folder / 'server.crt'}'\n"
                f"ssl_key_file = '{folder / 'server.key'}'\n"
                f"ssl_ca_file = '{folder / 'ca.crt'}'\n"
                "ssl_min_protocol_version = 'TLSv1.2'\nfsync = off\n"
                "logging_collector = off\n"
            )
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostssl all all ::1/128 scram-sha-256\n"
        )
        chown_tree(folder, owner)

    # -- what clients use ------------------------------------------------------------------

    def classic_params(self, dbname: str = "postgres") -> dict[str, str]:
        """libpq keywords for the way a pre-17 server does TLS: plaintext SSLRequest first."""
        return {
            "host": self.server_hostname,
            "hostaddr": "127.0.0.1",
            "port": str(self.port),
            "dbname": dbname,
            "user": self.username,
            "password": self.password,
            "sslmode": "verify-full",
            "sslnegotiation": "postgres",
            "sslrootcert": str(self.pki.ca_file),
            "connect_timeout": "5",
        }

    def direct_params(self, dbname: str = "postgres") -> dict[str, str]:
        """The same with direct TLS, which this server cannot do."""
        return {**self.classic_params(dbname), "sslnegotiation": "direct"}

    def server_version_num(self) -> int:
        import psycopg2

        conn = psycopg2.connect(**self.classic_params())
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version_num")
                row = cur.fetchone()
        finally:
            conn.close()
        return int(row[0]) if row else 0

    def _accepts_classic_tls(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(**self.classic_params()).close()
        except psycopg2.OperationalError:
            return False
        return True
