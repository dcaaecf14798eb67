"""No fragment of a password in any error, repr or display form of the URL parsers."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote, unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from packit_broker import ConfigError
from packit_broker.config import broker_from_env, database_from_env, redis_from_url
from tests.secrets_scan import leaked, passwords, surrogate

URL_BREAKERS = frozenset("/?#") | frozenset(" \t\n\r\x0b\x0c")


def _amqp(password: str) -> str:
    url = f"amqps://packit:{password}@rabbitmq.apps.example.test:443/vhost"
    broker = broker_from_env({"PACKIT_BROKER_URL": url})
    assert broker.password == unquote(password)
    return repr(broker) + broker.display_url


def _postgres(password: str) -> str:
    url = f"postgresql://packit:{password}@postgres.apps.example.test:443/packit"
    db = database_from_env({"PACKIT_DATABASE_URL": url})
    assert db is not None and db.password == unquote(password)
    return repr(db) + db.display_url


def _redis(password: str) -> str:
    redis = redis_from_url(f"redis://:{password}@127.0.0.1:6379/0")
    assert redis.password == (unquote(password) or None)
    return repr(redis) + redis.display_url


def _redis_acl(password: str) -> str:
    redis = redis_from_url(f"rediss://migrator:{password}@redis.example.test:6380/2")
    assert redis.password == (unquote(password) or None)
    return repr(redis) + redis.display_url + repr({**redis.client_kwargs(), "password": "-"})


PARSERS: dict[str, Callable[[str], str]] = {
    "amqp": _amqp,
    "postgresql": _postgres,
    "redis": _redis,
    "redis-acl": _redis_acl,
}


def _output(parse: Callable[[str], str], password: str) -> tuple[str, bool]:
    """What a parser shows for this password: its error, or the endpoint's repr and display."""
    try:
        return parse(password), True
    except ConfigError as exc:
        return f"{exc}|{exc.variable}|{exc.problem}|{exc!r}", False


@pytest.mark.parametrize("kind", sorted(PARSERS))
@settings(max_examples=400, deadline=None)
@given(password=passwords())
@example(password="abc/defgh")  # today: "Port could not be cast to integer value as 'abc'"
@example(password="s3cr3t#frag")
@example(password="s3cr3t?query=1")
@example(password="a@b/c@d:e%zz")
@example(password="100%25:@[]")
def test_unencoded_passwords_parse_or_fail_without_a_fragment(kind: str, password: str) -> None:
    """Every printable character, unencoded: the parse is exact or refused, and silent."""
    parse = PARSERS[kind]
    output, parsed = _output(parse, password)
    reference, reference_parsed = _output(parse, surrogate(password))
    assert parsed == reference_parsed
    assert leaked(password, output, reference) == []
    # A URL is refused exactly when it cannot be split without guessing.
    assert parsed == (not URL_BREAKERS & set(password))


@pytest.mark.parametrize("kind", sorted(PARSERS))
@settings(max_examples=200, deadline=None)
@given(password=passwords())
def test_percent_encoded_passwords_always_round_trip(kind: str, password: str) -> None:
    output, parsed = _output(PARSERS[kind], quote(password, safe=""))
    reference, _ = _output(PARSERS[kind], quote(surrogate(password), safe=""))
    assert parsed, output
    assert leaked(password, output, reference) == []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://:pw@127.0.0.1:6379/0?socket_timeout=1", "unsupported"),
        ("redis://:pw@127.0.0.1:6379/x", "number"),
        ("redis://secret-as-user@127.0.0.1:6379/0", "no password"),
        ("redis://:pw@127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "rediss://"),
        ("rediss://:pw@h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("unix://:pw@host/sock", "socket path"),
        ("http://:pw@h/0", "wrong scheme http://"),
        ("hunter2", "expected a URL like"),
    ],
)
def test_redis_url_mistakes_are_named_not_echoed(url: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        redis_from_url(url, "--from")
    assert caught.value.variable == "--from"
    assert words in str(caught.value)
    for secret in ("pw", "secret-as-user", "hunter2", "maybe", "socket_timeout"):
        assert secret not in caught.value.problem


def test_redis_url_forms() -> None:
    plain = redis_from_url("redis://:p%2Fw@127.0.0.1:7000/3")
    assert plain.client_kwargs() == {"db": 3, "host": "127.0.0.1", "port": 7000, "password": "p/w"}
    assert plain.display_url == "redis://:***@127.0.0.1:7000/3"
    tls = redis_from_url("rediss://acl:pw@redis.example.test/1?ssl_ca_certs=/ca.pem")
    assert tls.client_kwargs() == {
        "db": 1,
        "host": "redis.example.test",
        "port": 6379,
        "username": "acl",
        "password": "pw",
        "ssl": True,
        "ssl_ca_certs": "/ca.pem",
        "ssl_check_hostname": True,
    }
    socket = redis_from_url("unix://:pw@/run/redis.sock?db=2")
    assert socket.client_kwargs() == {
        "db": 2,
        "unix_socket_path": "/run/redis.sock",
        "password": "pw",
    }
    assert redis_from_url("redis://localhost").client_kwargs() == {
        "db": 0,
        "host": "localhost",
        "port": 6379,
    }


def test_a_mangled_url_never_names_its_host_port_or_scheme() -> None:
    """Whatever sits where the host, port or scheme should be may be part of a password."""
    for url in (
        "amqps://user:Qz7k/Wx9",  # no @HOST: "Qz7k" would have been the port
        "amqps://user:Qz7k Wx9@h/",
        "Qz7k://Wx9@h/",
        "amqps://Qz7k@Wx9/",
        "amqps://u:p@Qz7k\\Wx9/",
    ):
        with pytest.raises(ConfigError) as caught:
            broker_from_env({"PACKIT_BROKER_URL": url})
        for fragment in ("Qz7", "z7k", "Wx9"):
            assert fragment not in caught.value.problem, caught.value.problem


@settings(max_examples=500, deadline=None)
@given(url=st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_redis_parser_only_ever_raises_config_error(url: str) -> None:
    for candidate in (url, "redis://" + url, "rediss://:" + url, "unix://" + url):
        try:
            endpoint = redis_from_url(candidate)
        except ConfigError:
            continue
        assert endpoint.display_url


@pytest.mark.parametrize("port", ["9" * 5000, "0655350", "65536", "0", "٣"])
def test_odd_ports_are_config_errors(port: str) -> None:
    with pytest.raises(ConfigError, match="port"):
        broker_from_env({"PACKIT_BROKER_URL": f"amqps://u:p@h.example.test:{port}/"})
