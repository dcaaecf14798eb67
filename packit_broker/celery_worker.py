"""Worker-side hooks `celery_config()` registers: what Celery settings alone cannot give a worker.

On Celery's `worker_init` signal, for the worker's app:
- `GreenEventConnectionGuard`: green-pool workers keep running with publisher confirms and
  heartbeats on (below);
- `DeadLetterQueues`: the dead-letter queue of each quorum queue the worker consumes exists
  (`packit_broker.queues.DEAD_LETTER_SUFFIX`), so a task past its delivery limit is kept;
- `ChannelPrefetch`: a worker of classic queues on RabbitMQ 4.x keeps the channel-wide prefetch
  that lets it take more tasks while it holds countdown tasks (below);
- an ERROR in the worker log when the app's result backend was not built by `celery_config()`
  (a Redis the private side cannot reach; readers and writers on different backends).

The green-pool stall: under `--pool=gevent` or `--pool=eventlet` Celery 5.7's blocking loop
(`celery.worker.loops.synloop`) reads the event dispatcher's AMQP connection from two greenlets
at once: the main greenlet drains it every cycle so broker heartbeats are consumed, while a task
or timer greenlet that publishes an event (`task-received`, `worker-heartbeat`) waits on the same
socket for its publisher confirm. py-amqp keeps one read buffer per connection and no lock, so
the two readers split a frame between them; the confirm waiter then blocks forever in a socket
read (gevent ignores the `SO_RCVTIMEO` that bounds such a read for prefork and threads workers)
while holding the dispatcher's mutex, and the main greenlet blocks on that mutex the next time it
receives a task. The worker then stops consuming and cannot act on SIGTERM. The guard serialises
every use of that connection on the dispatcher's own mutex: the loop's drain and the heartbeat
check skip a cycle while an event is being published (the publish itself is traffic the broker
counts as a heartbeat) instead of reading beside it. Prefork and threads workers are untouched.

The green-pool throughput cap: the same loop drains the event connection after every message
it takes from the task connection, waiting up to 0.1 s for a frame that almost never comes (the
event connection carries only confirms and heartbeats), so a gevent worker ran at most about
ten tasks a second whatever its concurrency. The guard makes that drain a poll of
`recovery.EVENT_DRAIN_TIMEOUT`: a frame already there is read, none is waited for.

The green-pool reconnect stall: Celery's `worker-heartbeat` event is published with `retry=True`
and no retry policy, which kombu takes as "reconnect forever", under the dispatcher's mutex.
When the broker connection is cut (a router reload with `hard-stop-after`, a node loss), the
heartbeat timer greenlet starts reconnecting the old event connection while the consumer's
restart closes that very connection and then waits for the mutex to retire the dispatcher: the
heartbeat greenlet never gets its connection, the restart never ends, and the worker logs
"Connected to amqps://..." and never consumes again. The guard publishes every event of a green
worker without retry, as Celery already does for task events: the consumer's restart builds a
new dispatcher on a new connection, and a heartbeat missed while it does is logged and dropped.

The countdown block on classic queues: Celery holds a task whose ETA is ahead unacknowledged and
raises the prefetch count by one (`basic.qos`) so the worker can take the next task meanwhile.
Only a channel-wide prefetch (`global=true` in RabbitMQ's terms) changes for a consumer that is
already running; a per-consumer one applies to consumers started later. kombu 5.7 reports
per-consumer semantics for every RabbitMQ from 4.0 (celery/kombu#2481), so a prefetch-1 worker
holding one countdown task takes nothing else until it is due. On classic queues the step puts
the channel-wide prefetch back where the broker permits it (RabbitMQ 4.0-4.2 by default; 4.3
denies it unless `deprecated_features.permit.global_qos = true`) and says in the worker log how
to get out when it does not. Quorum queues need neither: countdowns go through native delayed
delivery (`packit_broker.delayed_delivery`) and the worker holds none.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from celery import bootsteps, signals
from kombu.exceptions import OperationalError

from packit_broker.queues import is_quorum, quorum_arguments
from packit_broker.recovery import EVENT_DRAIN_TIMEOUT

EVENTS_STEP = "celery.worker.consumer.events:Events"
TASKS_STEP = "celery.worker.consumer.tasks:Tasks"
#: Brokers (host, port, vhost) this process found to refuse a channel-wide prefetch.
_no_channel_prefetch: set[tuple[str, int, str]] = set()
logger = logging.getLogger("packit_broker.celery_worker")


def _skip_while_busy(
    mutex: Any, call: Callable[..., Any], busy: Callable[[], Any]
) -> Callable[..., Any]:
    """`call` under `mutex`, or `busy()` without waiting when another greenlet holds it."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if not mutex.acquire(False):
            return busy()
        try:
            return call(*args, **kwargs)
        finally:
            mutex.release()

    guarded.__wrapped__ = call  # type: ignore[attr-defined]
    return guarded


def _drain_busy() -> None:
    raise TimeoutError("event dispatcher is publishing; drain skipped this cycle")


def _poll_briefly(drain: Callable[..., Any]) -> Callable[..., Any]:
    """`drain` waiting at most EVENT_DRAIN_TIMEOUT: the loop polls, it does not wait there."""

    @functools.wraps(drain)
    def poll(timeout: float | None = None, **kwargs: Any) -> Any:
        brief = EVENT_DRAIN_TIMEOUT if timeout is None else min(timeout, EVENT_DRAIN_TIMEOUT)
        return drain(timeout=brief, **kwargs)

    return poll


def guard_event_connection(connection: Any, mutex: Any) -> None:
    """Make `connection`'s drain and heartbeat check wait their turn behind `mutex`'s holder,
    and the drain a brief poll."""
    if getattr(connection.drain_events, "__wrapped__", None) is not None:
        return  # already guarded (the step restarts with the consumer, the connection may not)
    connection.drain_events = _skip_while_busy(
        mutex, _poll_briefly(connection.drain_events), _drain_busy
    )
    connection.heartbeat_check = _skip_while_busy(mutex, connection.heartbeat_check, lambda: None)


def publish_without_retry(dispatcher: Any, errors: tuple[type[BaseException], ...]) -> None:
    """Make `dispatcher.send` try once: a retry would reconnect forever under its mutex.

    A send that asked for a retry (the worker heartbeat) and meets a lost connection is logged
    and dropped instead of raised in its timer greenlet; other sends raise as they did.
    """
    send = dispatcher.send
    if getattr(send, "__wrapped__", None) is not None:
        return

    def send_once(type: str, *args: Any, retry: bool = False, **kwargs: Any) -> Any:
        kwargs.pop("retry_policy", None)
        try:
            return send(type, *args, retry=False, **kwargs)
        except errors as exc:
            if not retry:
                raise
            logger.info("packit-broker: %s event not sent, connection lost (%r)", type, exc)
            return None

    send_once.__wrapped__ = send  # type: ignore[attr-defined]
    dispatcher.send = send_once


class GreenEventConnectionGuard(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step that guards the event connection of green-pool workers (see module doc)."""

    requires = (EVENTS_STEP,)

    def start(self, c: Any) -> None:
        dispatcher = getattr(c, "event_dispatcher", None)
        if not getattr(c.pool, "is_green", False) or dispatcher is None:
            return
        if dispatcher.connection is not None:
            guard_event_connection(dispatcher.connection, dispatcher.mutex)
            connection = dispatcher.connection
            errors = (*connection.connection_errors, *connection.channel_errors, OperationalError)
            publish_without_retry(dispatcher, errors)


class DeadLetterQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step that declares the dead-letter queue of each queue the worker consumes.

    A quorum queue declared by `celery_config()` dead-letters a task after its delivery limit
    through the default exchange to `<queue>.dead-letter`; RabbitMQ drops it if that queue does
    not exist, so the worker that declares the queue declares its dead-letter queue too.
    """

    requires = (TASKS_STEP,)

    def start(self, c: Any) -> None:
        consumer = getattr(c, "task_consumer", None)
        if consumer is None or c.connection is None:
            return
        channel = c.connection.default_channel
        for queue in consumer.queues:
            target = dead_letter_target(queue.queue_arguments or {})
            if target is not None:
                channel.queue_declare(
                    target, durable=True, auto_delete=False, arguments=quorum_arguments()
                )


class ChannelPrefetch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: channel-wide prefetch for a classic-queue worker on RabbitMQ 4.x.

    Runs after Celery's task step and before the consumer starts: with no quorum queue
    consumed and Celery set for a per-consumer prefetch, it lifts the per-consumer limit and
    moves the same count to the channel, where Celery's ETA increments take effect.
    """

    requires = (TASKS_STEP,)

    def start(self, c: Any) -> None:
        consumer = getattr(c, "task_consumer", None)
        if consumer is None or c.connection is None or getattr(c, "qos_global", None) is not False:
            return
        if not _classic_only(consumer.queues) or not _is_rabbitmq(c.connection):
            return
        if not _channel_prefetch_permitted(c.connection):
            logger.error("packit-broker: %s", NO_CHANNEL_PREFETCH)
            return
        consumer.qos(prefetch_count=0, apply_global=False)  # no per-consumer limit on top

        def set_prefetch_count(prefetch_count: int) -> Any:
            return consumer.qos(prefetch_count=prefetch_count, apply_global=True)

        c.qos_global = True
        c.qos.callback = set_prefetch_count
        c.qos.set(c.qos.value)


NO_CHANNEL_PREFETCH = (
    "RabbitMQ refuses a channel-wide prefetch (basic.qos global, a deprecated feature denied by"
    " default from RabbitMQ 4.3): Celery cannot raise this worker's prefetch while it holds a"
    " countdown task from a classic queue, so each such task blocks one slot of the worker until"
    " its ETA. Fix: quorum queues (PACKIT_BROKER_QUEUE_TYPE=quorum; countdowns then go through"
    " native delayed delivery), or on every RabbitMQ node"
    " `deprecated_features.permit.global_qos = true` (docs/usage.md, countdowns)"
)


def _classic_only(queues: Any) -> bool:
    """Whether none of the queues is a quorum queue (whose countdowns need no prefetch)."""
    return not any(is_quorum(q.queue_arguments) for q in queues)


def _is_rabbitmq(connection: Any) -> bool:
    """Whether the worker's broker is RabbitMQ over AMQP 0-9-1."""
    if connection.transport.driver_type != "amqp":
        return False
    properties = getattr(connection.connection, "server_properties", None) or {}
    return properties.get("product") in ("RabbitMQ", b"RabbitMQ")


def _channel_prefetch_permitted(connection: Any) -> bool:
    """Whether the broker accepts `basic.qos` with `global=true`, tried on a connection of its own.

    RabbitMQ answers a denied deprecated feature by closing the channel or the connection, so
    the question goes over a throwaway connection; a broker that refused once is not asked again.
    If that connection cannot be opened the answer is yes: the worker then behaves as Celery
    did before kombu 5.7, and Celery's own recovery handles a refusal on its channel.
    """
    info = connection.info()
    key = (str(info.get("hostname")), int(info.get("port") or 0), str(info.get("virtual_host")))
    if key in _no_channel_prefetch:
        return False
    probe = connection.clone()
    try:
        try:
            probe.connect()
        except probe.connection_errors:
            return True
        try:
            channel = probe.channel()
            channel.basic_qos(0, 1, True)
            channel.close()
        except probe.connection_errors + probe.channel_errors:
            _no_channel_prefetch.add(key)
            return False
    finally:
        probe.release()
    return True


def dead_letter_target(arguments: dict[str, Any]) -> str | None:
    """The queue a queue's arguments dead-letter into through the default exchange, if any."""
    routing_key = arguments.get("x-dead-letter-routing-key")
    if arguments.get("x-dead-letter-exchange") == "" and isinstance(routing_key, str):
        return routing_key
    return None


#: Result backends `celery_config()` emitted in this process (the app owns no other).
_owned_backends: set[str] = set()
#: Backends that travel over the broker connection, which the Route carries.
_THROUGH_BROKER = ("rpc", "amqp", "amqps")


def own_backend(url: str) -> None:
    """Remember a result backend URL `celery_config()` built (so the worker does not warn)."""
    _owned_backends.add(url)


def unowned_backend(backend: object) -> str | None:
    """Why the app's result backend may be out of a private worker's reach, or None if fine.

    The text names the scheme, host and port only: the URL's password stays out of the log.
    """
    if not isinstance(backend, str) or not backend or backend in _owned_backends:
        return None
    parts = urlsplit(backend)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme in _THROUGH_BROKER or scheme in ("disabled", "cache"):
        return None
    try:
        where = f"{parts.hostname or 'localhost'}:{parts.port}" if parts.port else parts.hostname
    except ValueError:
        where = None
    return (
        f"the app's result backend ({scheme}://{where or ''}) was not set by packit-broker's"
        " celery_config(): workers in the private cluster reach only what the Route carries"
        " (the broker and PostgreSQL with direct TLS), and result readers on the old backend"
        " never see results stored elsewhere. Fix: set PACKIT_RESULT_BACKEND_URL (and its _CA_FILE)"
        " for the workers and every process that reads results, switching them together"
        " (docs/usage.md, results), or set task_ignore_result=True if nothing reads results"
    )


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """`worker_init` receiver: add the step to the worker's app; report an unowned backend."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    app.steps["consumer"].add(GreenEventConnectionGuard)
    app.steps["consumer"].add(DeadLetterQueues)
    app.steps["consumer"].add(ChannelPrefetch)
    problem = unowned_backend(app.conf.result_backend)
    if problem is not None:
        logger.error("packit-broker: %s", problem)


_installed = threading.Event()


def install() -> None:
    """Register the worker hook once per process (called by `celery_config()`)."""
    if not _installed.is_set():
        signals.worker_init.connect(_on_worker_init, weak=False)
        _installed.set()
