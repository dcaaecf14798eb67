"""One classification of what went wrong, shared by `migrate` and `check`.

Through a router every misconfiguration looks alike to stock clients ("Server unexpectedly
closed connection"), and during a migration two servers are in play: an error is useful only
if it names the side (Redis, RabbitMQ or PostgreSQL), the layer, what was seen and the fix.
The library raises; `Diagnosis` is what the CLI renders and what `check` reports.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from packit_broker.queues import is_quorum

REDIS, RABBITMQ, POSTGRESQL = "Redis", "RabbitMQ", "PostgreSQL"


@dataclass(frozen=True)
class Diagnosis:
    side: str  # Redis | RabbitMQ | PostgreSQL
    layer: str  # dns | tcp | tls | certificate | router | amqp-login | permission | ...
    endpoint: str  # display form, never with a password
    seen: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.layer}] {self.side} at {self.endpoint}: {self.seen}\n  fix: {self.fix}"


class Diagnosed(RuntimeError):
    """An error whose diagnosis is already known where it happened (e.g. in the sink)."""

    def __init__(self, diagnosis: Diagnosis) -> None:
        super().__init__(str(diagnosis))
        self.diagnosis = diagnosis


# -- RabbitMQ: queue arguments ---------------------------------------------------------------

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for queue '(?P<queue>.*)' in vhost '.*':"
    r" received (?P<received>.+?) but current is (?P<current>.+)$"
)
_VALUE = re.compile(r"^(?:the value )?'(?P<value>.*?)'(?: of type '(?P<type>[^']+)')?$")
_INT_TYPES = {"signedint", "long", "short", "byte", "unsignedbyte", "unsignedshort", "unsignedint"}


def _parse_value(text: str) -> Any:
    """RabbitMQ's rendering of one argument value -> the Python value (None: not set)."""
    text = text.strip()
    if text == "none":
        return None
    match = _VALUE.match(text)
    if match is None:
        return text
    value, kind = match["value"], match["type"]
    if kind in _INT_TYPES or (kind is None and value.lstrip("-").isdigit()):
        return int(value)
    if value in ("true", "false") and kind in (None, "bool"):
        return value == "true"
    return value


def parse_inequivalent(text: str) -> tuple[str, Any, Any] | None:
    """PRECONDITION_FAILED text -> (argument, value we sent, value the queue has), or None."""
    match = _INEQUIVALENT.search(text)
    if match is None:
        return None
    return match["arg"], _parse_value(match["received"]), _parse_value(match["current"])


def existing_arguments(
    declare: Callable[[Mapping[str, Any]], None], wanted: Mapping[str, Any], first_error: str
) -> dict[str, Any] | None:
    """The arguments the existing queue was declared with, learnt from the broker itself.

    RabbitMQ names one inequivalent argument per refusal; `declare(arguments)` (a passive-safe
    redeclare on a fresh channel that raises PreconditionFailed) is retried with the value the
    broker says is current until it is accepted. A redeclaration with the queue's own arguments
    changes nothing. None when the broker's text cannot be parsed.
    """
    import amqp

    arguments = dict(wanted)
    text = first_error
    for _ in range(8):
        parsed = parse_inequivalent(text)
        if parsed is None:
            return None
        name, _, current = parsed
        if current is None:
            arguments.pop(name, None)
        else:
            arguments[name] = current
        try:
            declare(arguments)
        except amqp.exceptions.PreconditionFailed as exc:
            text = str(exc.reply_text or exc)
            continue
        return arguments
    return None


def _lacks_dead_letter(wanted: Mapping[str, Any], existing: Mapping[str, Any] | None) -> bool:
    """An existing quorum queue that only misses the dead-letter arguments we add."""
    if existing is None or not is_quorum(existing):
        return False
    dead_letter = ("x-dead-letter-exchange", "x-dead-letter-routing-key", "x-delivery-limit")
    rest = {k: v for k, v in wanted.items() if k not in dead_letter}
    return "x-dead-letter-routing-key" not in existing and dict(existing) == rest


def queue_mismatch(
    endpoint: str,
    queue: str,
    wanted: Mapping[str, Any],
    existing: Mapping[str, Any] | None,
    text: str,
) -> Diagnosis:
    if existing is None:
        seen = f"queue {queue!r} exists with other arguments ({text}); wanted {dict(wanted)}"
    else:
        seen = (
            f"queue {queue!r} exists with arguments {dict(existing)}, the workers' declaration"
            f" wants {dict(wanted)} (PRECONDITION_FAILED)"
        )
    if _lacks_dead_letter(wanted, existing):
        return Diagnosis(
            RABBITMQ,
            "queue-arguments",
            endpoint,
            f"quorum queue {queue!r} has no dead-letter target and no explicit delivery limit"
            f" (arguments {dict(existing or {})}): RabbitMQ 4 drops a task after 20 deliveries,"
            " and a worker crash or a cut connection counts as one",
            f"recreate it with this version's arguments {dict(wanted)}: move its tasks out (or"
            " let the workers drain it), `rabbitmqctl delete_queue"
            f" {queue}`, then start the workers or run `packit-broker check`, which declare it"
            " with its dead-letter queue (docs/usage.md, dead letters); nothing was moved",
        )
    return Diagnosis(
        RABBITMQ,
        "queue-arguments",
        endpoint,
        seen,
        "set PACKIT_BROKER_QUEUE_TYPE / PACKIT_BROKER_MAX_PRIORITY to what the queue has (if the"
        " workers really use that), or, if the queue is wrong, drain it and delete it"
        f" (`rabbitmqctl delete_queue {queue}`) before migrating; nothing was moved",
    )


# -- RabbitMQ: alarms, message size, per-message refusals -----------------------------------


def blocked(endpoint: str, reason: str, waited: float) -> Diagnosis:
    what = "memory" if "memory" in reason else "disk" if "disk" in reason else "resource"
    return Diagnosis(
        RABBITMQ,
        "resource-alarm",
        endpoint,
        f"RabbitMQ blocked publishing ({reason!r}: a {what} alarm) and did not lift it within"
        f" {waited:g} s",
        (
            "free memory on the broker (consume or purge queues, raise the pod's memory limit or"
            " vm_memory_high_watermark); `rabbitmq-diagnostics alerts` shows the alarm"
            if what == "memory"
            else "free disk space on the broker (or lower disk_free_limit);"
            " `rabbitmq-diagnostics alerts` shows the alarm"
        )
        + "; then rerun, or pass a longer --blocked-timeout to wait it out",
    )


_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def too_large(text: str) -> tuple[int, int] | None:
    """(size, limit) from RabbitMQ's max_message_size refusal, or None."""
    match = _TOO_LARGE.search(text)
    return (int(match[1]), int(match[2])) if match else None


def message_too_large(endpoint: str, size: int, limit: int, what: str) -> Diagnosis:
    return Diagnosis(
        RABBITMQ,
        "message-size",
        endpoint,
        f"RabbitMQ refused {what}: its body of {size} bytes is larger than the broker's"
        f" max_message_size {limit}",
        f"rerun with --max-message-size {limit} (larger messages are then quarantined, kept"
        " byte-exact in Redis) or raise max_message_size in rabbitmq.conf",
    )


def too_large_reason(size: int, limit: int) -> str:
    return (
        f"RabbitMQ refused it: its body of {size} bytes is larger than the broker's"
        f" max_message_size {limit} (raise max_message_size to move it)"
    )


NACK_REASON = (
    "RabbitMQ refused it (basic.nack): the queue is at its max-length/max-length-bytes limit"
    " with overflow reject-publish (a policy or queue argument), or the queue is unavailable"
)


def queue_refuses_all(endpoint: str, queue: str, waited: float) -> Diagnosis:
    """Every message for `queue` nacked through the whole retry window: not a poison message."""
    return Diagnosis(
        RABBITMQ,
        QUEUE_UNAVAILABLE,
        endpoint,
        f"RabbitMQ refused (basic.nack) every message for {queue!r} and accepted none for"
        f" {waited:.0f} s: the queue has no leader (a quorum queue that lost its majority, nodes"
        " down or partitioned) or is full with overflow reject-publish",
        "check `rabbitmq-queues quorum_status QUEUE` / `rabbitmq-diagnostics cluster_status`"
        " and the queue's length policy, then rerun (nothing of the refused batch left Redis;"
        " a longer --nack-retry-seconds waits longer)",
    )


#: AMQP's reply code for a mandatory message that reached no queue.
NO_ROUTE = 312


def unroutable_after_redeclare(endpoint: str, queue: str) -> Diagnosis:
    """A queue that vanished, was declared again, and still routes nothing: the environment
    (a binding or exchange removed, a policy), not the messages; they stay in Redis."""
    return Diagnosis(
        RABBITMQ,
        QUEUE_UNAVAILABLE,
        endpoint,
        f"RabbitMQ returned messages for {queue!r} as unroutable (312 NO_ROUTE) even after the"
        " queue was declared again as the workers declare it",
        f"check the exchange and bindings of {queue!r} (`rabbitmqctl list_bindings`) and any"
        " policy that removes them; nothing of the returned batch left Redis (a following"
        " bridge tries again after a pause)",
    )


def return_reason(code: int, text: str, exchange: str, routing_key: str) -> str:
    return (
        f"RabbitMQ returned it as unroutable ({code} {text}): exchange {exchange!r} with routing"
        f" key {routing_key!r} reaches no queue"
    )


# -- RabbitMQ: a connection lost mid-run ----------------------------------------------------


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc`, met on a RabbitMQ connection that *had been established*, means the
    connection is gone for reasons outside the configuration (a node stopped or killed, the
    router restarted, the network cut, heartbeats missed), so reconnecting may help.

    The settings were proven by the first connection: a socket, TLS or AMQP connection error
    now is the environment. Not retried: a certificate that fails verification and a login or
    permission refusal (someone changed them), and what the sink already diagnosed (a queue
    with other arguments, an alarm outlasting --blocked-timeout, a queue that nacked
    everything through --nack-retry-seconds, a message too large).
    """
    import amqp

    if isinstance(exc, Diagnosed):
        return False
    if isinstance(exc, amqp.exceptions.RecoverableConnectionError):
        return True  # ConnectionForced (a node shutting down, missed heartbeats), closed
    if isinstance(exc, amqp.exceptions.AMQPError):
        return False  # login, permission, vhost, preconditions: not the network
    if isinstance(exc, ssl.SSLError):
        # A session cut short (the peer or the router went away) is the network; any other
        # TLS failure - our certificate expired or now required, an unknown CA, a plaintext
        # answer - is a setting, retrying it forever would only hide it.
        return isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError) or (
            "timed out" in str(exc)
        )
    return isinstance(exc, OSError | EOFError)


QUEUE_UNAVAILABLE = "queue-unavailable"


def queue_unavailable(exc: BaseException) -> bool:
    """Whether `exc` is a queue that nacked everything through the retry window (no leader,
    or full): a following bridge waits that out as it waits out a lost node."""
    return isinstance(exc, Diagnosed) and exc.diagnosis.layer == QUEUE_UNAVAILABLE


def describe_loss(exc: BaseException) -> str:
    """What a lost connection looked like, in words an operator can act on."""
    if isinstance(exc, Diagnosed):
        return exc.diagnosis.seen
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    if name == "ConnectionForced" and "heartbeat" in text.lower():
        what = "no heartbeat from RabbitMQ for two intervals: its node froze or was cut off"
    elif name == "ConnectionForced":
        what = "the RabbitMQ node closed the connection (it is shutting down or restarting)"
    elif isinstance(exc, TimeoutError | socket.timeout):
        what = "RabbitMQ stopped answering (a node frozen or cut off, or the network)"
    else:
        what = "the RabbitMQ node or the router in front of it dropped the connection"
    return f"{what} ({name}: {text})"


def _reconnect_layer(last: BaseException) -> tuple[str, str]:
    """(layer, what the last reconnect attempt showed) for a reconnect that never succeeded."""
    if isinstance(last, ConnectionRefusedError):
        return (
            "router",
            "nothing accepts TCP connections at the address dialled: the router (or, without"
            " one, the RabbitMQ node itself) is down",
        )
    if isinstance(last, TimeoutError | socket.timeout):
        return (
            "tcp",
            "connection attempts time out: the network or a firewall drops them, or the node"
            " is frozen",
        )
    if isinstance(last, socket.gaierror):
        return "dns", "the host name does not resolve any more"
    return (
        "node-lost",
        "the router accepts connections but no RabbitMQ node behind it completes the handshake"
        " (the session is closed before AMQP starts): the node was lost - stopped, killed or"
        " its pod gone - and no other node has taken its place",
    )


def reconnect_failed(
    endpoint: str,
    lost: BaseException,
    last: BaseException,
    waited: float,
    attempts: int,
    relost: int = 0,
) -> Diagnosis:
    """The connection was lost mid-run and every reconnect within the bound failed;
    `relost`: reconnects of the same outage that worked but were lost again at once."""
    layer, shown = _reconnect_layer(last)
    if relost:
        shown += (
            f"; {relost} reconnect(s) in this outage worked but each connection was lost again"
            " within seconds (a node restarting over and over, or a flapping network)"
        )
    fixes = {
        "router": "start the router / check the Route and PACKIT_BROKER_CONNECT_TO",
        "tcp": "check the network path to the router and the node's health",
        "dns": "check the host name and the cluster's DNS",
        "node-lost": "start the RabbitMQ node (`oc get pods`, `rabbitmq-diagnostics status`;"
        " a cluster: `rabbitmq-diagnostics cluster_status`)",
    }
    return Diagnosis(
        RABBITMQ,
        layer,
        endpoint,
        f"the connection was lost mid-run - {describe_loss(lost)} - and {attempts} reconnect"
        f" attempts over {waited:.0f} s failed: {shown} (last: {type(last).__name__}:"
        f" {str(last) or type(last).__name__})",
        f"{fixes[layer]}; then rerun the same command - that is safe: nothing unconfirmed left"
        " Redis, and the task ids that were in flight are kept in Redis and listed under"
        " possible_duplicates by the next report",
    )


# -- Redis -----------------------------------------------------------------------------------

LIST_CHANGED = "packit: list changed under the migrator"


def _redis(exc: BaseException, endpoint: str) -> Diagnosis | None:
    import redis

    text = str(exc) or type(exc).__name__
    if isinstance(exc, redis.exceptions.ReadOnlyError) or text.startswith("READONLY"):
        return Diagnosis(
            REDIS,
            "redis-replica",
            endpoint,
            f"this Redis is a read-only replica ({text})",
            "point --from (PACKIT_REDIS_URL) at the primary: `redis-cli ROLE` or `INFO"
            " replication` on this server names it (master_host, master_port)",
        )
    if isinstance(exc, redis.exceptions.AuthenticationError) or any(
        word in text for word in ("NOAUTH", "WRONGPASS", "invalid password")
    ):
        return Diagnosis(
            REDIS,
            "redis-login",
            endpoint,
            f"Redis refused the login ({type(exc).__name__})",
            "wrong or missing Redis password (or ACL user) in the --from URL; percent-encode"
            " special characters",
        )
    if isinstance(exc, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return Diagnosis(
            REDIS,
            "permission",
            endpoint,
            text,
            "the Redis ACL user may not run this command or touch these keys: it needs read and"
            " write on the queue keys, EVAL/EVALSHA, SCAN and CLIENT LIST",
        )
    if LIST_CHANGED in text:
        return Diagnosis(
            REDIS,
            "concurrent-writer",
            endpoint,
            "a queue list changed between reading a batch and removing it: another client"
            " popped or trimmed it (a Celery worker still consuming, or a second migrate)",
            "stop every Celery worker and any other migrate using this Redis, then rerun: the"
            " batch stays in Redis and its task ids are reported as possible duplicates",
        )
    if isinstance(exc, redis.exceptions.ResponseError):
        return Diagnosis(REDIS, "redis", endpoint, text, "see the Redis server's log")
    return None


# -- transport layers (every side) ------------------------------------------------------------


def _cert_failure(
    exc: ssl.SSLCertVerificationError, side: str, endpoint: str, host: str
) -> Diagnosis:
    message = exc.verify_message or str(exc)
    if exc.verify_code == 62 or "hostname mismatch" in message.lower():
        fix = (
            f"the server certificate does not name {host!r}: issue it with {host} in its SAN"
            " (or use the Route host in the URL)"
        )
    elif exc.verify_code == 10 or "expired" in message.lower():
        fix = "the server certificate has expired: renew it (cert-manager: check the Certificate)"
    else:
        fix = (
            "the certificate chain does not lead to the CA you trust: set *_CA_FILE to the CA"
            " that signed the server certificate; if this is the router's own certificate, no"
            f" Route exists for {host!r} (check `oc get route` and the SNI host)"
        )
    return Diagnosis(side, "certificate", endpoint, message, fix)


def _transport(
    exc: BaseException, side: str, endpoint: str, host: str, connected: bool
) -> Diagnosis | None:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return Diagnosis(side, "dns", endpoint, text, "check the host name, or set *_CONNECT_TO")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _cert_failure(exc, side, endpoint, host)
    if isinstance(exc, ConnectionRefusedError):
        return Diagnosis(
            side, "tcp", endpoint, text, "nothing listens there: check the address/port"
        )
    if connected and isinstance(exc, OSError | EOFError):
        # Mid-run, a TLS or socket error is a lost connection, not a handshake problem.
        return Diagnosis(
            side,
            "connection",
            endpoint,
            f"the connection was lost during the run ({type(exc).__name__}: {text})",
            f"{side} or the router restarted or cut the connection: check that it is up"
            " (`packit-broker check`) and rerun; nothing unconfirmed was removed",
        )
    if isinstance(exc, ssl.SSLError):
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return Diagnosis(
                side, "tls", endpoint, text, "the port speaks plaintext: use the TLS port"
            )
        return Diagnosis(
            side, "tls", endpoint, text, "TLS handshake failed: check TLS versions/ciphers"
        )
    if isinstance(exc, TimeoutError | socket.timeout):
        return Diagnosis(
            side, "tcp", endpoint, text, "no answer: a firewall, or the wrong address/port"
        )
    return None


def _rabbitmq(exc: BaseException, endpoint: str) -> Diagnosis | None:
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    if name == "AccessRefused" and "login was refused" in text.lower():
        return Diagnosis(
            RABBITMQ,
            "amqp-login",
            endpoint,
            text,
            "wrong user name or password in the URL: correct it, percent-encoding special"
            " characters (`rabbitmqctl list_users` shows who exists)",
        )
    if name == "AccessRefused":
        return Diagnosis(
            RABBITMQ,
            "permission",
            endpoint,
            text,
            "the user lacks configure/write permission on these queues or exchanges: grant it"
            " (rabbitmqctl set_permissions) or choose the queues with --queue",
        )
    if name in ("NotAllowed", "ConnectionForced") and "vhost" in text.lower():
        return Diagnosis(
            RABBITMQ,
            "permission",
            endpoint,
            text,
            "the vhost does not exist or the user has no access to it",
        )
    if size := too_large(text):
        return message_too_large(endpoint, size[0], size[1], "a message")
    if "unexpectedly closed" in text.lower() or isinstance(exc, ConnectionResetError | EOFError):
        return Diagnosis(
            RABBITMQ,
            "router",
            endpoint,
            text,
            "the TLS session ended before AMQP started: the broker behind the Route is down, or"
            " the client sent no SNI (run `packit-broker check`)",
        )
    return None


def classify(
    exc: BaseException, side: str, endpoint: str, host: str = "", *, connected: bool = False
) -> Diagnosis:
    """Any error met while talking to `side` -> its layer and fix.

    `connected`: the connection had been established (a later TLS/socket error is then a lost
    connection, never a handshake failure).
    """
    if isinstance(exc, Diagnosed):
        return exc.diagnosis
    found = _redis(exc, endpoint) if side == REDIS else None
    found = found or _transport(exc, side, endpoint, host, connected)
    if side == RABBITMQ:
        found = found or _rabbitmq(exc, endpoint)
    if found is not None:
        return found
    name = type(exc).__name__
    return Diagnosis(
        side, "connection", endpoint, f"{name}: {exc}", "run `packit-broker check` for this side"
    )
