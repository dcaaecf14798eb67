"""The stack: start, reach and stop the local stand-in of production."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from packit_broker.config import HostPort
from packit_broker.router import PassthroughRoute
from packit_broker.stack.certs import Pki, make_pki, require_trustme
from packit_broker.stack.postgres import init_tls_cluster, postgres17_bindir, reachable_bindir
from packit_broker.stack.processes import (
    Process,
    StackError,
    free_port,
    require,
    require_reachable,
    service_user,
    wait_until,
)
from packit_broker.stack.rabbitmq import RABBITMQ_SBIN, amqps_login, future_defaults, node_env
from packit_broker.stack.router_process import router_process, tcp_open

DOMAIN = "apps.packit.test"
LIMITED_QUEUE_PREFIX = "limited."


@dataclass(frozen=True)
class Account:
    username: str
    password: str

    def __repr__(self) -> str:
        return f"Account({self.username!r}, password=***)"


def _rabbit_password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class Stack:
    """Redis, RabbitMQ (TLS only), PostgreSQL 17 (TLS) and the router, under one temp folder.

    Ports are chosen free on 127.0.0.1. Passwords are random per stack.
    """

    def __init__(self, root: Path | None = None, domain: str = DOMAIN) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="packit-stack-")) if root is None else root
        self.root.chmod(0o711)  # the unprivileged PostgreSQL user must traverse it
        self.domain = domain
        self.rabbit_host = f"rabbitmq.{domain}"
        self.postgres_host = f"postgres.{domain}"
        self.pki: Pki = make_pki(self.root / "pki", (self.rabbit_host, self.postgres_host), domain)
        self.redis_password = secrets.token_urlsafe(12)
        self.broker_account = Account("packit", secrets.token_urlsafe(12))
        self.limited_account = Account("limited", secrets.token_urlsafe(12))
        self.db_account = Account("packit", secrets.token_urlsafe(12))
        self.redis_port = free_port()
        self.amqps_port = free_port()
        self.router_port = free_port()
        self.postgres_port = free_port()
        self.processes: dict[str, Process] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> Stack:
        try:
            self.check_installed()
            self.start_redis()
            self.start_rabbitmq()
            self.start_postgres()
            self.start_router()
        except OSError as exc:  # a file or folder the stack needs is not usable: say which
            self.stop()
            raise StackError(f"the stack could not start: {exc}") from exc
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def check_installed() -> None:
        """Fail fast, naming every missing package, before starting anything."""
        problems = []
        for binary, package, where in (
            ("redis-server", "redis-server", ()),
            ("rabbitmq-server", "rabbitmq-server", RABBITMQ_SBIN),
            ("epmd", "erlang-base", ()),
            ("haproxy", "haproxy", ()),
        ):
            try:
                require(binary, package, where=where)
            except StackError as exc:
                problems.append(str(exc))
        try:
            postgres17_bindir()
        except StackError as exc:
            problems.append(str(exc))
        try:
            require_trustme()
        except StackError as exc:
            problems.append(str(exc))
        if problems:
            raise StackError("\n".join(problems))

    def stop(self, *, remove: bool = True) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
        if remove and self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _folder(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- Redis -----------------------------------------------------------------------------

    def start_redis(self) -> None:
        binary = require("redis-server", "redis-server")
        folder = self._folder("redis")
        conf = folder / "redis.conf"
        conf.write_text(
            f"port {self.redis_port}\nbind 127.0.0.1\nprotected-mode yes\n"
            f'requirepass "{self.redis_password}"\nsave ""\nappendonly no\ndir {folder}\n'
        )
        conf.chmod(0o600)
        proc = self.processes.setdefault(
            "redis", Process("redis", [binary, str(conf)], folder / "redis.log")
        )
        proc.start()
        wait_until(lambda: tcp_open(self.redis_port), proc, 20, "redis-server")

    def redis_url(self, db: int = 0) -> str:
        return f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/{db}"

    # -- RabbitMQ --------------------------------------------------------------------------

    def _rabbit_definitions(self) -> dict[str, object]:
        users = [
            {
                "name": account.username,
                "password_hash": _rabbit_password_hash(account.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": tags,
            }
            for account, tags in (
                (self.broker_account, ["administrator"]),
                (self.limited_account, []),
            )
        ]
        limited = "^" + LIMITED_QUEUE_PREFIX.replace(".", r"\.") + ".*"
        return {
            "users": users,
            "vhosts": [{"name": "/"}],
            "permissions": [
                {"user": "packit", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
                {
                    "user": "limited",
                    "vhost": "/",
                    "configure": limited,
                    "write": limited,
                    "read": limited,
                },
            ],
        }

    def rabbitmq_conf(self, definitions: Path) -> str:
        return "\n".join(
            [
                "listeners.tcp = none",
                f"listeners.ssl.default = 127.0.0.1:{self.amqps_port}",
                f"ssl_options.cacertfile = {self.pki.ca_file}",
                f"ssl_options.certfile = {self.pki.server.cert_file}",
                f"ssl_options.keyfile = {self.pki.server.key_file}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "ssl_options.versions.1 = tlsv1.3",
                "ssl_options.versions.2 = tlsv1.2",
                f"default_user = {self.broker_account.username}",
                f"default_pass = {self.broker_account.password}",
                f"load_definitions = {definitions}",
                "consumer_timeout = 7200000",
                *future_defaults(),
                "log.console = true",
                "log.console.level = warning",
                "log.file = false",
                "",
            ]
        )

    def start_rabbitmq(self) -> None:
        server = require("rabbitmq-server", "rabbitmq-server", where=RABBITMQ_SBIN)
        epmd = require("epmd", "erlang-base")
        folder = self._folder("rabbitmq")
        if "rabbitmq" not in self.processes:
            definitions = folder / "definitions.json"
            definitions.write_text(json.dumps(self._rabbit_definitions(), indent=1))
            conf = folder / "rabbitmq.conf"
            conf.write_text(self.rabbitmq_conf(definitions))
            (folder / "enabled_plugins").write_text("[].\n")
            for path in (definitions, conf):
                path.chmod(0o600)
            epmd_port = free_port()
            env = node_env(
                folder, f"packit{self.amqps_port}@localhost", conf, epmd_port, free_port()
            )
            self.processes["epmd"] = Process(
                "epmd", [epmd, "-port", str(epmd_port)], folder / "epmd.log", env=env
            )
            self.processes["rabbitmq"] = Process(
                "rabbitmq", [server], folder / "rabbitmq.log", env=env, cwd=folder
            )
        self.processes["epmd"].start()
        proc = self.processes["rabbitmq"]
        proc.start()
        wait_until(self._rabbit_ready, proc, 90, "rabbitmq-server")

    def _rabbit_ready(self) -> bool:
        return amqps_login(
            self.amqps_port,
            username=self.broker_account.username,
            password=self.broker_account.password,
            ca_file=self.pki.ca_file,
            server_hostname=self.rabbit_host,
        )

    # -- PostgreSQL 17 ---------------------------------------------------------------------

    def start_postgres(self) -> None:
        owner = service_user()
        require_reachable(self.root, owner)
        bindir = reachable_bindir(postgres17_bindir(), owner, self.root / "postgres-install")
        folder = self._folder("postgres")
        data = folder / "data"
        if "postgres" not in self.processes:
            init_tls_cluster(
                str(bindir / "initdb"),
                folder,
                self.postgres_port,
                self.db_account.username,
                self.db_account.password,
                self.pki,
                owner,
            )
            self.processes["postgres"] = Process(
                "postgres",
                [str(bindir / "postgres"), "-D", str(data)],
                folder / "postgres.log",
                user=owner,
            )
        proc = self.processes["postgres"]
        proc.start()
        wait_until(
            lambda: (data / "postmaster.pid").exists() and tcp_open(self.postgres_port),
            proc,
            30,
            "postgres",
        )
        self._wait_postgres_accepts(proc)

    def _wait_postgres_accepts(self, proc: Process) -> None:
        import psycopg2

        def ready() -> bool:
            try:
                psycopg2.connect(**self.postgres_direct_params()).close()
            except psycopg2.OperationalError:
                return False
            return True

        wait_until(ready, proc, 30, "postgres (direct TLS)")
        conn = psycopg2.connect(**self.postgres_direct_params())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = 'packit'")
            if cur.fetchone() is None:
                cur.execute("CREATE DATABASE packit")
        conn.close()

    def postgres_direct_params(self, dbname: str = "postgres") -> dict[str, str]:
        """libpq keywords straight to the server (not through the router), direct TLS."""
        return {
            "host": self.postgres_host,
            "hostaddr": "127.0.0.1",
            "port": str(self.postgres_port),
            "dbname": dbname,
            "user": self.db_account.username,
            "password": self.db_account.password,
            "sslmode": "verify-full",
            "sslnegotiation": "direct",
            "sslrootcert": str(self.pki.ca_file),
        }

    # -- the router stand-in ---------------------------------------------------------------

    def routes(self) -> tuple[PassthroughRoute, ...]:
        return (
            PassthroughRoute("rabbitmq", self.rabbit_host, HostPort("127.0.0.1", self.amqps_port)),
            PassthroughRoute(
                "postgres", self.postgres_host, HostPort("127.0.0.1", self.postgres_port)
            ),
        )

    def start_router(self, routes: tuple[PassthroughRoute, ...] | None = None) -> None:
        """Start (or restart) the router; `routes` replaces the default two Routes."""
        if routes is not None or "router" not in self.processes:
            old = self.processes.pop("router", None)
            if old is not None:
                old.stop()
            self.processes["router"] = router_process(
                self._folder("router"),
                self.router_port,
                self.pki.router_default_pem,
                self.routes() if routes is None else routes,
            )
        proc = self.processes["router"]
        proc.start()
        wait_until(lambda: tcp_open(self.router_port), proc, 20, "haproxy (router)")

    # -- what clients use ------------------------------------------------------------------

    def broker_env(
        self, account: Account | None = None, *, via_router: bool = True, vhost: str = ""
    ) -> dict[str, str]:
        """`PACKIT_BROKER_*` for a client in the "private cluster" (through the router)."""
        account = account or self.broker_account
        port = 443 if via_router else 5671
        dial = self.router_port if via_router else self.amqps_port
        return {
            "PACKIT_BROKER_URL": f"amqps://{account.username}:{account.password}@"
            f"{self.rabbit_host}:{port}/{vhost}",
            "PACKIT_BROKER_CA_FILE": str(self.pki.ca_file),
            "PACKIT_BROKER_CONNECT_TO": f"127.0.0.1:{dial}",
        }

    def database_env(
        self, prefix: str = "PACKIT_RESULT_BACKEND_", *, dbname: str = "packit"
    ) -> dict[str, str]:
        a = self.db_account
        return {
            prefix + "URL": f"postgresql://{a.username}:{a.password}@{self.postgres_host}:443/"
            f"{dbname}",
            prefix + "CA_FILE": str(self.pki.ca_file),
            prefix + "CONNECT_TO": f"127.0.0.1:{self.router_port}",
        }

    @contextlib.contextmanager
    def amqp_connection(self) -> Iterator[Any]:
        """A py-amqp connection through the router, with the workers' TLS settings."""
        import amqp

        from packit_broker.config import broker_from_env
        from packit_broker.tls import amqp_ssl_options

        broker = broker_from_env(self.broker_env())
        assert broker.tls is not None
        connection = amqp.Connection(
            str(broker.dial),
            userid=broker.username,
            password=broker.password,
            ssl=amqp_ssl_options(broker.tls),
            connect_timeout=10,
        )
        connection.connect()
        try:
            yield connection
        finally:
            connection.close()

    def client_env(self) -> dict[str, str]:
        return {**self.broker_env(), **self.database_env(), **self.database_env("PACKIT_DATABASE_")}
