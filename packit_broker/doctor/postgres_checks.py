"""The PostgreSQL layers: direct TLS login, server version >= 17, negotiation info."""

from __future__ import annotations

from packit_broker.config import ConfigError, DatabaseEndpoint
from packit_broker.doctor.results import CheckResult, _Report
from packit_broker.doctor.tls_probe import DEFAULT_TIMEOUT, TlsFacts, _via_route, probe_tls
from packit_broker.tls import LIBPQ_DIRECT_TLS_VERSION

POSTGRES_ALPN = "postgresql"


def server_version_problem(version_num: int) -> str | None:
    """Pure: why a server of `SHOW server_version_num` cannot serve us, or None."""
    if version_num < LIBPQ_DIRECT_TLS_VERSION:
        major = version_num // 10000
        return (
            f"PostgreSQL older than 17 cannot do direct TLS (server is {major},"
            f" server_version_num {version_num})"
        )
    return None


def _postgres_failure(
    report: _Report, exc: BaseException, db: DatabaseEndpoint, facts: TlsFacts
) -> None:
    text = (str(exc) or type(exc).__name__).strip()
    lowered = text.lower()
    if "password authentication failed" in lowered or "authentication failed" in lowered:
        report.fail(
            "db-login",
            f"login refused for user {db.username!r}: {text}",
            f"wrong user name or password in {db.variable_prefix}URL",
        )
    elif "no pg_hba.conf entry" in lowered:
        report.fail(
            "db-login",
            text,
            "add a `hostssl DB USER ADDRESS scram-sha-256` line to pg_hba.conf (the router's"
            " pod network is the client address)",
        )
    elif "does not exist" in lowered and "database" in lowered:
        report.fail(
            "database",
            text,
            f"create the database ({db.dbname!r}) or correct the path of {db.variable_prefix}URL",
        )
    elif "sslnegotiation" in lowered or "invalid connection option" in lowered:
        report.fail(
            "client",
            text,
            "the libpq in use is older than 17: pip install 'psycopg2-binary>=2.9.11'",
        )
    elif "closed the connection" in lowered or "eof" in lowered or "timeout" in lowered:
        if facts.router_default_suspect and facts.cert is not None:
            report.fail(
                "router",
                f"{text}: no Route for this host: the router answered with its default"
                f" certificate ({facts.cert.names})",
                f"create a passthrough Route whose spec.host is exactly {db.host!r}",
            )
        else:
            report.fail(
                "router",
                f"{text} right after a valid TLS handshake: PostgreSQL behind the Route is down"
                " (or not listening on the Service's targetPort), or it is older than 17 and"
                " cannot do direct TLS",
                "check the PostgreSQL pods, `oc get endpoints SERVICE`, and that the server is"
                " PostgreSQL 17+ with ssl = on",
            )
    else:
        report.fail("postgresql", text, "see the PostgreSQL server log")


def check_database(
    db: DatabaseEndpoint,
    name: str = "database",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    results: list[CheckResult] | None = None,
) -> list[CheckResult]:
    """PostgreSQL with direct TLS: network layers, login, version >= 17, negotiation info.

    Results go to `results` (when given) as each layer is done, as for `check_broker`."""
    import psycopg2

    from packit_broker.database import connect_args

    report = _Report(name, db.display_url, (db.password,), [] if results is None else results)
    facts = probe_tls(
        report,
        db.dial,
        db.tls,
        port_in_url=db.port,
        connect_to=db.connect_to,
        alpn=(POSTGRES_ALPN,),
        timeout=timeout,
        kind="postgresql",
    )
    if facts is None:
        return report.results
    try:
        args = connect_args(db)
    except ConfigError as exc:
        report.fail("client", str(exc), "see the message")
        return report.results
    try:
        conn = psycopg2.connect(
            dbname=db.dbname,
            user=db.username,
            connect_timeout=str(max(2, int(timeout))),
            application_name="packit-broker check",
            **args,
        )
    except psycopg2.Error as exc:
        _postgres_failure(report, exc, db, facts)
        return report.results
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version_num")
            row = cur.fetchone()
            version_num = int(row[0]) if row else 0
            cur.execute("SHOW server_version")
            row = cur.fetchone()
            version = str(row[0]) if row else "?"
            cur.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            ssl_row = cur.fetchone()
    except psycopg2.Error as exc:
        report.fail("postgresql", str(exc).strip(), "see the PostgreSQL server log")
        return report.results
    finally:
        conn.close()
    report.ok("db-login", f"logged in as {db.username!r} to database {db.dbname!r}")
    problem = server_version_problem(version_num)
    if problem:
        report.fail(
            "version",
            problem,
            "upgrade the server to PostgreSQL 17+ (and clients to libpq 17+); only direct TLS"
            " crosses a passthrough Route",
        )
        return report.results
    ssl_text = f", TLS {ssl_row[1]}" if ssl_row and ssl_row[0] else ", NOT TLS"
    report.ok("version", f"PostgreSQL {version} (server_version_num {version_num}){ssl_text}")
    if _via_route(db.port, db.connect_to):
        report.info(
            "negotiation",
            "direct TLS (sslnegotiation=direct) works; classic negotiation"
            " (sslnegotiation=postgres, libpq < 17 and most drivers) starts in plaintext and"
            " would not be routed through a Route",
        )
    else:
        report.info("negotiation", "direct TLS (sslnegotiation=direct) works")
    return report.results
