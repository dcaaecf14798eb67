"""A PostgreSQL *older than 17* with TLS, for tests of what clients see when direct TLS is missing.

Test-only (not shipped). PostgreSQL 15 does TLS only after the classic plaintext SSLRequest: a
direct TLS ClientHello (libpq 17's `sslnegotiation=direct`, the only kind a passthrough Route can
route) is read as a startup packet of absurd length and the connection is closed.

Where it comes from: Debian 12's `postgresql-15` (/usr/lib/postgresql/15/bin), or, on releases
without it (Debian 13), the same bookworm packages unpacked by tests/rig/legacy-postgres.sh
under LEGACY_UNPACKED, run with their libraries on LD_LIBRARY_PATH. It is started like
`Stack.start_postgres` starts PostgreSQL 17 (initdb as the unprivileged service user, ssl = on
with the stack's server certificate, `hostssl` + scram-sha-256 only) on a free loopback port.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from packit_broker.stack.certs import Pki
from packit_broker.stack.postgres import (
    SYSTEM_POSTGRES,
    init_tls_cluster,
    reachable_bindir,
    system_bindirs,
)
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
#: Where tests/rig/legacy-postgres.sh unpacks bookworm's packages on other Debian releases.
LEGACY_UNPACKED = Path("/var/cache/packit-broker/legacy-postgresql-15")


@dataclass(frozen=True)
class LegacyInstall:
    bindir: Path
    env: dict[str, str] = field(default_factory=dict)


def legacy_install(
    unpacked: Path = LEGACY_UNPACKED, system_root: Path = SYSTEM_POSTGRES
) -> LegacyInstall:
    """Debian's postgresql-15, or bookworm's unpacked copy; StackError naming the fix."""
    system = system_bindirs(system_root).get(LEGACY_MAJOR)
    if system is not None:
        return LegacyInstall(system)
    bindir = unpacked / f"usr/lib/postgresql/{LEGACY_MAJOR}/bin"
    if (bindir / "postgres").is_file() and os.access(bindir / "postgres", os.X_OK):
        libdir = unpacked / f"usr/lib/{platform.machine()}-linux-gnu"
        return LegacyInstall(bindir, {"LD_LIBRARY_PATH": str(libdir)})
    raise StackError(
        f"PostgreSQL {LEGACY_MAJOR} not found (neither {LEGACY_PACKAGE} nor {bindir}); fix: on"
        f" Debian 12 `apt-get install {LEGACY_PACKAGE}`, elsewhere `bash tests/rig/"
        "legacy-postgres.sh` (a test-only server; scripts/bootstrap.sh runs it for the tests)"
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
    ) -> None:
        self.pki = pki
        self.server_hostname = server_hostname
        self.username = username
        self.password = secrets.token_urlsafe(12) if password is None else password
        self.install = legacy_install()
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
        bindir = reachable_bindir(self.install.bindir, owner, self.root / "install")
        env = self.install.env  # its libraries stay in LEGACY_UNPACKED (0755 folders)
        data = init_tls_cluster(
            str(bindir / "initdb"), self.root, self.port, self.username, self.password,
            self.pki, owner, env,
        )  # fmt: skip
        self.process = Process(
            "postgres-15",
            [str(bindir / "postgres"), "-D", str(data)],
            self.root / "postgres.log",
            env=env,
            user=owner,
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
