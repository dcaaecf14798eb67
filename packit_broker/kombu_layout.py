"""Pure: where kombu's Redis transport keeps a Celery app's messages, from its transport options.

An app configures the layout with `broker_transport_options` (kombu's
`redis.Channel.from_transport_options`): the separator of priority lists (`sep`), the priority
buckets (`priority_steps`), a prefix on every key (`global_keyprefix`), and the names of the
`unacked` hash, its index and its mutex. `KombuLayout` is built from that same dict and is the
one definition every part of the migrator uses to read or write kombu's keys; its methods follow
kombu's `Channel._q_for_pri`, `Channel.priority` and `_get_message_priority` exactly.
"""

from __future__ import annotations

import json
import re
from bisect import bisect
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_SEP = "\x06\x16"
DEFAULT_PRIORITY_STEPS = (0, 3, 6, 9)
MIN_PRIORITY, MAX_PRIORITY = 0, 9  # kombu's virtual Channel clamps message priorities to 0..9
QUEUE_ORDER_STRATEGIES = ("round_robin", "sorted", "priority")
BINDING_PREFIX = "_kombu.binding."
#: kombu 5.7 also records each binding of a queue without x-expires here (its sweep of expired
#: binding tables keeps a table while this set has members); older kombu ignores it.
PERMANENT_BINDING_PREFIX = "_kombu.binding_permanent."

#: Options of kombu's Redis channel and connection that do not change where messages are kept:
#: accepted (an app's whole `broker_transport_options` can be passed) and ignored.
IGNORED_OPTIONS = frozenset(
    {
        "ack_emulation",
        "visibility_timeout",
        "unacked_restore_limit",
        "unacked_restore_interval",
        "unacked_restore_throttle",
        "fanout_prefix",
        "fanout_patterns",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "max_connections",
        "health_check_interval",
        "retry_on_timeout",
        "client_name",
        "body_encoding",
        "deadletter_queue",
        "polling_interval",
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "retry_policy",
        "result_chord_ordered",
        "master_name",
        "sentinel_kwargs",
        "min_other_sentinels",
        "sentinel_fanout_compat",
        "reauth_check_interval",
        "brpop_timeout",
    }
)


class LayoutError(ValueError):
    """The transport options cannot describe a kombu Redis layout; the message says which."""


@dataclass(frozen=True)
class KombuLayout:
    """kombu's Redis key layout for one app (defaults = kombu's defaults)."""

    sep: str = DEFAULT_SEP
    priority_steps: tuple[int, ...] = DEFAULT_PRIORITY_STEPS
    global_keyprefix: str = ""
    unacked_key: str = "unacked"
    unacked_index_key: str = "unacked_index"
    unacked_mutex_key: str = "unacked_mutex"
    unacked_mutex_expire: int = 300
    queue_order_strategy: str = "round_robin"

    def __post_init__(self) -> None:
        steps = self.priority_steps
        if not steps or list(steps) != sorted(set(steps)) or steps[0] < 0:
            raise LayoutError(
                f"priority_steps {list(steps)!r} must be distinct non-negative integers in"
                " ascending order (kombu bisects them)"
            )
        if not self.sep:
            raise LayoutError("sep must not be empty")
        if self.queue_order_strategy not in QUEUE_ORDER_STRATEGIES:
            raise LayoutError(
                f"queue_order_strategy {self.queue_order_strategy!r} is not one of"
                f" {', '.join(QUEUE_ORDER_STRATEGIES)}"
            )

    @classmethod
    def from_transport_options(cls, options: Mapping[str, Any]) -> KombuLayout:
        """The layout an app with `broker_transport_options=options` writes; LayoutError if an
        option is unknown or of the wrong type (a typo would otherwise read the wrong keys)."""
        typed = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in options.items():
            if name in IGNORED_OPTIONS:
                continue
            if name not in typed:
                raise LayoutError(
                    f"unknown transport option {name!r} (kombu's Redis transport has no such"
                    " option; check its spelling)"
                )
            values[name] = _typed(name, value)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> KombuLayout:
        try:
            options = json.loads(text)
        except ValueError as exc:
            raise LayoutError(f"transport options are not JSON ({exc})") from None
        if not isinstance(options, dict):
            raise LayoutError("transport options must be a JSON object, like the app's dict")
        return cls.from_transport_options(options)

    def as_options(self) -> dict[str, Any]:
        """The transport options that recreate this layout (for messages and reports)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }

    # -- priorities, as kombu computes them ---------------------------------------------

    def priority(self, n: int) -> int:
        """kombu's `Channel.priority`: the step a priority number is filed under."""
        steps = self.priority_steps
        return steps[bisect(steps, n) - 1]

    def bucket_of(self, message_priority: int) -> int:
        """The step a message with `message_priority` lands in (kombu clamps to 0..9 first)."""
        return self.priority(min(max(message_priority, MIN_PRIORITY), MAX_PRIORITY))

    def reachable_steps(self) -> tuple[int, ...]:
        """The steps a message can actually be filed under (priorities 0..9), kombu's order."""
        reached = {self.bucket_of(p) for p in range(MIN_PRIORITY, MAX_PRIORITY + 1)}
        return tuple(step for step in self.priority_steps if step in reached)

    # -- key names ---------------------------------------------------------------------------

    def key(self, name: str) -> str:
        """Any key kombu writes, under the global prefix."""
        return self.global_keyprefix + name

    def queue_key(self, queue: str, step: int) -> str:
        """kombu's `_q_for_pri(queue, step)`, prefixed: the list of one priority bucket."""
        pri = self.priority(step)
        return self.key(f"{queue}{self.sep}{pri}" if pri else queue)

    def bucket_keys(self, queue: str) -> dict[int, str]:
        """step -> list key, in the order kombu consumes them."""
        return {step: self.queue_key(queue, step) for step in self.reachable_steps()}

    @property
    def unacked(self) -> str:
        return self.key(self.unacked_key)

    @property
    def unacked_index(self) -> str:
        return self.key(self.unacked_index_key)

    @property
    def unacked_mutex(self) -> str:
        return self.key(self.unacked_mutex_key)

    def binding_key(self, exchange: str) -> str:
        return self.key(BINDING_PREFIX + exchange)

    def permanent_binding_key(self, exchange: str) -> str:
        return self.key(PERMANENT_BINDING_PREFIX + exchange)

    def binding_member(self, routing_key: str, queue: str, pattern: str = "") -> str:
        """kombu's `_queue_bind` member `routing_key SEP pattern SEP queue` (a direct
        exchange's pattern is empty); `split_binding` reads it back."""
        return self.sep.join([routing_key, pattern, queue])

    @property
    def list_pattern(self) -> str:
        return glob_escape(self.global_keyprefix) + "*"

    def split_binding(self, member: str) -> tuple[str, str, str] | None:
        """A binding set member `routing_key SEP pattern SEP queue`, or None if it is not one."""
        parts = member.split(self.sep)
        if len(parts) != 3:
            return None
        return parts[0], parts[1], parts[2]

    def parse_list_key(self, key: str) -> tuple[str, int] | None:
        """A list key -> (queue, step) under this layout; None if outside the prefix.

        A name ending in `sep` + a number that is not a reachable step is returned as
        (whole name, 0): kombu would never write it, `foreign_bucket` tells it apart.
        """
        if not key.startswith(self.global_keyprefix):
            return None
        rest = key[len(self.global_keyprefix) :]
        base, sep, tail = rest.rpartition(self.sep)
        if sep and base and tail.isdigit() and int(tail) in self.reachable_steps()[1:]:
            return base, int(tail)
        return rest, 0

    def foreign_bucket(self, key: str) -> str | None:
        """Why a list key looks like a priority bucket of a *different* layout, or None."""
        parsed = self.parse_list_key(key)
        if parsed is None:
            return None
        rest = parsed[0]
        base, sep, tail = rest.rpartition(self.sep)
        if sep and base and tail.isdigit():
            return (
                f"looks like the priority-{tail} bucket of queue {base!r}, but priority_steps"
                f" is {list(self.priority_steps)}: set priority_steps as the app does"
            )
        if self.sep != DEFAULT_SEP and DEFAULT_SEP in rest:
            return f"uses kombu's default separator, not sep={self.sep!r}: set sep as the app does"
        return None


def guess_sep(name: str) -> str | None:
    """The separator a foreign priority list name seems to use (`short-running:3` -> ':')."""
    match = re.fullmatch(r"(.+?)([^A-Za-z0-9]+)([1-9])", name, flags=re.DOTALL)
    return match.group(2) if match else None


def glob_escape(text: str) -> str:
    """`text` as a literal inside a Redis SCAN MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _typed(name: str, value: Any) -> Any:
    if name == "priority_steps":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise LayoutError(f"priority_steps must be a list of integers, got {value!r}")
        return tuple(value)
    if name == "unacked_mutex_expire":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LayoutError(f"unacked_mutex_expire must be a positive integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise LayoutError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value


def control_reason(exchange: str | None, queue: str | None) -> str | None:
    """Why a binding or queue is Celery's transient control traffic (never a task queue).

    Remote control (`<node>.celery.pidbox` bound to the fanout `celery.pidbox`), its replies
    (`<uuid>.reply.celery.pidbox`) and events (`celeryev.<uuid>`) are exclusive or auto-delete
    queues their consumers declare themselves; made durable in RabbitMQ they lock the next
    worker of the same node name out (ResourceLocked).
    """
    if queue is not None and queue.endswith(".reply.celery.pidbox"):
        return "Celery remote-control reply queue"
    if (exchange or "").endswith(".pidbox") or (queue or "").endswith(".pidbox"):
        return "Celery remote-control (pidbox) queue of a worker"
    if exchange == "celeryev" or (queue or "").startswith("celeryev."):
        return "Celery event queue"
    return None
