"""The shared error classification: pure parts (RabbitMQ's texts, which side, which layer)."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import amqp
import pytest
import redis

from packit_broker import errors
from packit_broker.errors import RABBITMQ, REDIS, classify

# Texts as RabbitMQ 3.10 sends them (seen on the rig).
ABSENT_WANTED = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q' in vhost '/':"
    " received none but current is the value '5' of type 'signedint'"
)
BOTH_SET = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'q' in vhost '/':"
    " received '7' but current is '5'"
)
QUORUM = (
    "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/':"
    " received none but current is the value 'quorum' of type 'longstr'"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ABSENT_WANTED, ("x-max-priority", None, 5)),
        (BOTH_SET, ("x-max-priority", 7, 5)),
        (QUORUM, ("x-queue-type", None, "quorum")),
        ("NOT_FOUND - no queue 'q'", None),
    ],
)
def test_parse_inequivalent(text: str, expected: tuple[str, Any, Any] | None) -> None:
    assert errors.parse_inequivalent(text) == expected


def test_existing_arguments_follows_the_broker_until_accepted() -> None:
    """Two differing arguments: RabbitMQ names one per refusal; both are learnt."""
    existing = {"x-queue-type": "quorum"}
    tried: list[dict[str, Any]] = []

    def declare(arguments: Mapping[str, Any]) -> None:
        tried.append(dict(arguments))
        if dict(arguments) != existing:
            raise amqp.exceptions.PreconditionFailed(QUORUM)

    first = ABSENT_WANTED.replace("received none", "received '9'").replace(
        "current is the value '5' of type 'signedint'", "current is none"
    )
    assert errors.existing_arguments(declare, {"x-max-priority": 9}, first) == existing
    assert tried == [{}, {"x-queue-type": "quorum"}]


def test_existing_arguments_unparsable_is_none() -> None:
    assert errors.existing_arguments(lambda _: None, {}, "something else") is None


def test_too_large() -> None:
    text = "PRECONDITION_FAILED - message size 2000000 is larger than configured max size 1048576"
    assert errors.too_large(text) == (2000000, 1048576)
    assert errors.too_large("PRECONDITION_FAILED - other") is None


@pytest.mark.parametrize(
    ("exc", "layer"),
    [
        (
            redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
            "redis-replica",
        ),
        (redis.exceptions.AuthenticationError("invalid username-password pair"), "redis-login"),
        (redis.exceptions.ResponseError(errors.LIST_CHANGED), "concurrent-writer"),
        (redis.exceptions.NoPermissionError("NOPERM this user has no permissions"), "permission"),
    ],
)
def test_redis_errors_are_on_the_redis_side(exc: BaseException, layer: str) -> None:
    found = classify(exc, REDIS, "redis://***@h:6379/0", connected=True)
    assert (found.side, found.layer) == (REDIS, layer)
    assert str(found).startswith(f"[{layer}] Redis at redis://***@h:6379/0: ")


def test_a_tls_error_after_connecting_is_a_lost_connection_not_a_handshake() -> None:
    exc = ssl.SSLError(1, "[SSL: BAD_LENGTH] bad length")
    during = classify(exc, RABBITMQ, "amqps://u:***@h:443/", "h", connected=True)
    assert during.layer == "connection" and "handshake" not in str(during)
    before = classify(exc, RABBITMQ, "amqps://u:***@h:443/", "h")
    assert before.layer == "tls"


def test_blocked_names_memory_or_disk() -> None:
    memory = errors.blocked("e", "low on memory", 3)
    disk = errors.blocked("e", "low on disk", 3)
    assert memory.layer == disk.layer == "resource-alarm"
    assert "memory alarm" in memory.seen and "free memory" in memory.fix
    assert "disk alarm" in disk.seen and "free disk space" in disk.fix


def test_rabbitmq_access_refused_is_login_or_permission() -> None:
    login = amqp.exceptions.AccessRefused("Login was refused using authentication mechanism")
    queue = amqp.exceptions.AccessRefused("access to queue 'q' in vhost '/' refused")
    assert classify(login, RABBITMQ, "e").layer == "amqp-login"
    assert classify(queue, RABBITMQ, "e").layer == "permission"


def test_diagnosed_passes_through() -> None:
    known = errors.blocked("e", "low on memory", 1)
    assert classify(errors.Diagnosed(known), RABBITMQ, "other") is known


@pytest.mark.parametrize(
    ("exc", "lost"),
    [
        (OSError("Server unexpectedly closed connection"), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), True),
        (TimeoutError("timed out"), True),
        (amqp.exceptions.ConnectionForced("Too many heartbeats missed"), True),
        (amqp.exceptions.RecoverableConnectionError("connection already closed"), True),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), False),
        # The server refusing our TLS settings is a setting, not an outage: not retried.
        (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert"), False),
        (ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] alert"), False),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), False),
        (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)"), True),
        (ssl.SSLError("The read operation timed out"), True),
        (amqp.exceptions.AccessRefused("ACCESS_REFUSED - Login was refused"), False),
        (amqp.exceptions.PreconditionFailed("PRECONDITION_FAILED"), False),
        (errors.Diagnosed(errors.queue_refuses_all("e", "q", 30)), False),
        (redis.ConnectionError("Redis gone"), False),
    ],
)
def test_what_counts_as_a_lost_connection(exc: BaseException, lost: bool) -> None:
    assert errors.connection_lost(exc) is lost


def test_a_queue_refusing_everything_is_told_apart_for_follow() -> None:
    """--follow waits out a queue that nacks everything; nothing else that the sink diagnosed
    (a queue with other arguments, an alarm outlasting its timeout) is waited out."""
    refusing = errors.Diagnosed(errors.queue_refuses_all("amqps://h:443/", "short-running", 30))
    assert errors.queue_unavailable(refusing)
    assert "every message for 'short-running'" in errors.describe_loss(refusing)
    alarm = errors.Diagnosed(errors.blocked("amqps://h:443/", "low on memory", 60))
    assert not errors.queue_unavailable(alarm)
    assert not errors.queue_unavailable(TimeoutError("timed out"))


@pytest.mark.parametrize(
    ("last", "layer"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "router"),
        (OSError("Server unexpectedly closed connection"), "node-lost"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "node-lost"),
        (ConnectionResetError(104, "Connection reset by peer"), "node-lost"),
        (TimeoutError("timed out"), "tcp"),
    ],
)
def test_a_reconnect_that_never_succeeds_names_the_layer_not_sni(
    last: BaseException, layer: str
) -> None:
    lost = amqp.exceptions.ConnectionForced("CONNECTION_FORCED - broker forced connection closure")
    found = errors.reconnect_failed("amqps://u:***@h:443/", lost, last, 61.2, 7)
    assert (found.side, found.layer) == (RABBITMQ, layer)
    text = str(found)
    assert "lost mid-run" in text and "7 reconnect attempts over 61 s" in text
    assert "rerun the same command - that is safe" in text
    assert "SNI" not in text and "TLS handshake" not in text
    assert "shutting down" in text  # what the loss looked like


def test_a_give_up_after_reconnects_that_were_lost_again_says_so() -> None:
    lost = ConnectionResetError(104, "Connection reset by peer")
    last = OSError("Server unexpectedly closed connection")
    found = errors.reconnect_failed("amqps://u:***@h:443/", lost, last, 61.0, 4, relost=3)
    assert "3 reconnect(s) in this outage worked but each connection was lost again" in str(found)
    plain = errors.reconnect_failed("amqps://u:***@h:443/", lost, last, 61.0, 4)
    assert "worked but" not in str(plain)


# -- what `check` prints: the fix is an instruction, and a password never garbles it ----------


def test_a_login_refusal_says_what_to_correct() -> None:
    login = amqp.exceptions.AccessRefused("Login was refused using authentication mechanism")
    fix = classify(login, RABBITMQ, "amqps://packit:***@h:443/").fix
    assert fix.startswith("wrong user name or password in the URL: correct it")
    assert "percent-encod" in fix


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("not set; expected amqps://USER:PASSWORD@ROUTE_HOST:443/VHOST", "set PACKIT_BROKER_URL"),
        ("expected amqps://..., got 'http'", "correct PACKIT_BROKER_URL"),
    ],
)
def test_a_config_failure_fix_is_an_instruction(problem: str, expected: str) -> None:
    from packit_broker.config import ConfigError
    from packit_broker.doctor.results import config_failure

    result = config_failure("broker", ConfigError("PACKIT_BROKER_URL", problem))
    assert result.fix.startswith(expected + " ")
    assert "fix " not in result.fix  # printed after "fix: ", it read "fix: fix PACKIT_..."
    assert result.seen == problem


def test_a_short_password_that_is_a_word_does_not_garble_the_fix() -> None:
    """Password `wrong`: the fix stayed readable, the server's echo of it is still masked."""
    from packit_broker.doctor.results import _Report

    report = _Report("broker", "amqps://packit:***@h:443/", ("wrong",))
    report.fail(
        "amqp-login",
        "login refused for user 'packit': password wrong was refused",
        "wrong user name or password in PACKIT_BROKER_URL",
    )
    (result,) = report.results
    assert result.fix == "wrong user name or password in PACKIT_BROKER_URL"
    assert result.seen == "login refused for user 'packit': password *** was refused"
    long_secret = _Report("broker", "e", ("s3cret-passw0rd",))
    long_secret.fail("tls", "server said s3cret-passw0rd", "check the URL")
    assert "s3cret" not in long_secret.results[0].seen
