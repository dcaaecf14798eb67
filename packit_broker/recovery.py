"""Client timeouts that bound how long a node loss or a network cut can hold a client up.

Measured on a three-node cluster behind a router stand-in that balances a passthrough Route as
the OpenShift router does (tests/integration/test_cluster.py, docs/deploy.md):

- A node that *dies* closes its TCP sessions; the router closes the client's side too, so
  workers notice at once and reconnect. The router sends the reconnect (same source address,
  `balance source`) to the dead pod until its health check has failed 3 times at 5 s, or the pod
  has left the Service's endpoints; Celery retries after 2, 4, 6, ... s.
- A node that is *cut off* (or paused by `pause_minority`) sends nothing and closes nothing: the
  router keeps the client's side of the session open. Only the AMQP heartbeat notices: a
  connection counts as dead after two missed heartbeats. With RabbitMQ's 60 s that is 2 min of a
  worker sitting idle; with `HEARTBEAT` (10 s) it is 20-25 s, during which the router already
  marked the cut pod down, so the worker is back before a 30 s cut heals.
- A publisher waiting for a confirm from a node that was cut off used to block ~30 s and then
  raise. `READ_TIMEOUT` bounds every wait for the broker; Celery then reconnects and publishes
  again (`PUBLISH_RETRY_POLICY`), so `apply_async` returns or raises within
  `MAX_PUBLISH_BLOCK` seconds.

`migrate` (one-shot and `--follow`) reconnects itself after losing RabbitMQ mid-run, with the
pauses of `Backoff`: one-shot within `RECONNECT_WINDOW` (a quorum queue's leader election,
the router's health checks marking a dead pod down after 3 x 5 s, and a restarted node's boot
fit), `--follow` without limit (the bridge is a long-running Deployment).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from packit_broker.config import DEFAULT_HEARTBEAT

#: AMQP heartbeat (s) that clients propose (config.DEFAULT_HEARTBEAT, the one definition); the
#: smaller non-zero of client and server wins. RabbitMQ's guidance is 5-20 s; below 5 s a busy
#: client risks false positives.
HEARTBEAT = DEFAULT_HEARTBEAT
#: TCP + TLS + AMQP handshake through the router (Celery's `broker_connection_timeout`).
CONNECT_TIMEOUT = 5.0
#: Longest wait for one read or write on an established connection (py-amqp's socket
#: SO_RCVTIMEO/SO_SNDTIMEO), notably for a publisher confirm.
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 5.0
#: Longest wait of a green worker's loop for its event connection, once per message received
#: (Celery's 0.1 s capped a gevent worker at about 10 tasks/s; see celery_worker).
EVENT_DRAIN_TIMEOUT = 0.001
#: apply_async: reconnect and publish again up to 3 times, 1 s, 2 s, 2 s apart.
PUBLISH_RETRY_POLICY: Mapping[str, float] = {
    "max_retries": 3,
    "interval_start": 1,
    "interval_step": 1,
    "interval_max": 2,
}


def max_publish_block() -> float:
    """Upper bound (s) of one `apply_async` before it returns or raises."""
    attempts = int(PUBLISH_RETRY_POLICY["max_retries"]) + 1
    sleeps = sum(
        min(
            PUBLISH_RETRY_POLICY["interval_start"] + i * PUBLISH_RETRY_POLICY["interval_step"],
            PUBLISH_RETRY_POLICY["interval_max"],
        )
        for i in range(attempts - 1)
    )
    return attempts * (CONNECT_TIMEOUT + READ_TIMEOUT + WRITE_TIMEOUT) + sleeps


MAX_PUBLISH_BLOCK = max_publish_block()


def recovery_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The Celery settings above, merged into `config`'s broker settings (returned, not set).

    The heartbeat itself is PACKIT_BROKER_HEARTBEAT (default HEARTBEAT), already in `config`.
    """
    transport = dict(config.get("broker_transport_options") or {})
    transport.setdefault("read_timeout", READ_TIMEOUT)
    transport.setdefault("write_timeout", WRITE_TIMEOUT)
    return {
        "broker_connection_timeout": CONNECT_TIMEOUT,
        "broker_transport_options": transport,
        "task_publish_retry": True,
        "task_publish_retry_policy": dict(PUBLISH_RETRY_POLICY),
    }


#: migrate after a lost connection: first pause before reconnecting, then doubling up to
#: RECONNECT_MAX_PAUSE (1, 2, 4, 8, 15, 15, ... s).
RECONNECT_FIRST_PAUSE = 1.0
RECONNECT_MAX_PAUSE = 15.0
#: One-shot migrate gives up (exit 1, rerun safe) once this long has passed since the loss
#: without a working connection (`migrate --reconnect-seconds`); --follow never gives up.
RECONNECT_WINDOW = 60.0


@dataclass
class Backoff:
    """Pauses between reconnect attempts, capped, within `window` seconds (None: no limit).

    `next_pause()` is the pause before the next attempt, or None once the window is spent;
    the last pause is shortened so that one attempt still happens at the window's end.
    """

    window: float | None
    first: float = RECONNECT_FIRST_PAUSE
    cap: float = RECONNECT_MAX_PAUSE
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=-1.0)
    attempts: int = 0

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def next_pause(self) -> float | None:
        pause = min(self.first * 2.0 ** min(self.attempts, 32), self.cap)
        if self.window is not None:
            left = self.window - self.elapsed
            if left <= 0:
                return None
            pause = min(pause, left)
        self.attempts += 1
        return pause
