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
import tempfile
from pathlib import Path
from types import TracebackType

from packit_broker.stack.certs import Pki
from packit_broker.stack.postgres import init_tls_cluster
from packit_broker.stack.processes import (
    Process,
    StackError,
    free_port,
    service_user,
    wait_until,
)
from packit_broker.stack.router_process import tcp_open

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
        data = init_tls_cluster(
            self.initdb, self.root, self.port, self.username, self.password, self.pki, owner
        )
        self.process = Process(
            "postgres-15", [self.postgres, "-D", str(data)], self.root / "postgres.log", user=owner
        )
        self.process.start()
        wait_until(
            lambda: (data / "postmaster.pid").exists() and tcp_open(self.port),
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
