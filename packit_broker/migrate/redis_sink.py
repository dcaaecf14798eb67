"""I/O: writing task messages into kombu's Redis layout, each batch in one MULTI/EXEC.

A batch is accepted by Redis as a whole or not at all, and the in-flight journal naming its
task ids is written in the same transaction: there is no instant at which Redis holds a
message the journal does not name. The source acknowledges the batch only after that (see
packit_broker.migrate.amqp_source), so a crash leaves every possible duplicate listed.

What is written is what kombu's Redis transport writes (`Channel._put`, `_queue_bind`): the
envelope of packit_broker.codecs.to_redis, LPUSHed to the list of its priority bucket, and the
queue's binding set members, all under the app's `KombuLayout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from packit_broker.codecs import to_redis
from packit_broker.messages import MalformedMessage, TaskMessage
from packit_broker.migrate.protocols import Rejection, Ticket
from packit_broker.migrate.redis_source import INFLIGHT, RedisSource, inflight_payload
from packit_broker.migrate.report import REDELIVERED
from packit_broker.queues import QueueSpec


@dataclass(frozen=True)
class RedisEntry:
    """One envelope and the list (priority bucket) it goes to."""

    key: str
    payload: bytes


class Journal:
    """The in-flight journal of a run whose destination is Redis (the same key and format as
    the forward run's, so a crashed run of either direction is adopted by the next one).

    The driver marks before each send and after each commit; a mark before a send is only
    staged and written by the sink inside the batch's MULTI/EXEC, a mark after a commit is
    written at once (otherwise a crash would list an already acknowledged batch too).
    """

    def __init__(self, store: RedisSource) -> None:
        self.store = store
        self.key = store.own(INFLIGHT)
        self.staged: str | None = None
        self._write_next = False
        #: ids RabbitMQ redelivered, to list with the next batch (`doubt`), and those listed
        self.doubted: list[str] = []
        self._doubting: list[str] = []
        self.listed: list[str] = []

    def mark(self, where: str, task_ids: Sequence[str]) -> None:
        payload = inflight_payload(where, task_ids)
        if self._write_next:
            self._write_next = False
            self.store.client.set(self.key, payload)
        else:
            self.staged = payload

    def committed(self, *, keep: bool) -> None:
        """The source acknowledged a batch: forget it (keep: another is still in flight and
        the driver rewrites the journal next)."""
        if keep:
            self._write_next = True
        else:
            self.staged = None
            self.store.client.delete(self.key)

    def doubt(self, task_ids: Sequence[str]) -> None:
        """List these (redelivered) ids under REDELIVERED in the next batch's transaction."""
        self.doubted.extend(task_ids)

    def write_into(self, pipe: Any) -> None:
        if self.staged is not None:
            pipe.set(self.key, self.staged)
            self.staged = None
        if self.doubted:
            pipe.rpush(self.store.own(REDELIVERED), *self.doubted)
            self._doubting, self.doubted = self.doubted, []

    def accepted(self) -> None:
        """The transaction `write_into` joined was executed: what it doubted is listed."""
        self.listed.extend(self._doubting)
        self._doubting = []

    def rejected(self) -> None:
        """The transaction failed: what it was to list is doubted again with the next one."""
        self.doubted[:0] = self._doubting
        self._doubting = []


class RedisSink:
    """The Redis sink of the migration driver (packit_broker.migrate.protocols.Sink)."""

    def __init__(self, store: RedisSource, journal: Journal) -> None:
        self.store = store
        self.layout = store.layout
        self.journal = journal

    def prepare(self, target: QueueSpec) -> None:
        """The queue's binding, as a Redis worker declaring `target` would have written it
        (kombu's `_queue_bind`): a restored worker, or a producer, routes to it."""
        member = self.layout.binding_member(target.routing_key, target.name)
        pipe = self.store.client.pipeline(transaction=True)
        pipe.sadd(self.layout.binding_key(target.exchange), member)
        pipe.sadd(self.layout.permanent_binding_key(target.exchange), member)
        pipe.execute()

    def encode(self, message: TaskMessage, target: QueueSpec) -> RedisEntry:
        """The envelope kombu would have LPUSHed and its bucket's list; MalformedMessage if
        a header cannot be written as JSON (an AMQP timestamp, byte array or decimal)."""
        try:
            payload = to_redis(message, target.name, (target.exchange, target.routing_key))
        except (TypeError, ValueError) as exc:
            raise MalformedMessage(
                f"its headers cannot be carried in kombu's JSON envelope ({exc})"
            ) from None
        return RedisEntry(self.layout.queue_key(target.name, message.bucket), payload)

    def send(self, messages: Sequence[RedisEntry]) -> Ticket:
        """LPUSH the batch (runs of one list in one command, oldest first so the oldest is
        consumed first) and the staged journal, in one transaction; accepted on return."""
        pipe = self.store.client.pipeline(transaction=True)
        for key, run in _runs(messages):
            pipe.lpush(key, *run)
        self.journal.write_into(pipe)
        try:
            pipe.execute()
        except BaseException:
            self.journal.rejected()
            raise
        self.journal.accepted()
        return Ticket(len(messages), 0)

    def wait(self, ticket: Ticket) -> list[Rejection]:
        """Redis took the whole batch in `send` (or raised, taking nothing)."""
        return []


@dataclass(frozen=True)
class Durability:
    """What "Redis accepted the batch" is worth, from its persistence settings: the source
    forgets a message once Redis accepted it, so this is the rollback's only weak spot."""

    appendonly: str  # "yes" | "no" | "unknown" (CONFIG may be renamed or denied by ACL)
    appendfsync: str  # "always" | "everysec" | "no" | "unknown"
    eviction: str = "noeviction"  # maxmemory-policy: allkeys-* may evict accepted lists

    @property
    def evicts(self) -> bool:
        return self.eviction.startswith("allkeys")

    @property
    def level(self) -> str:
        if self.appendonly == "yes" and self.appendfsync == "always":
            return "fsync-always"
        if self.appendonly == "yes":
            return f"aof-{self.appendfsync}"
        return "memory" if self.appendonly == "no" else "unknown"

    @property
    def warning(self) -> str | None:
        """What an operator must know before RabbitMQ forgets what Redis took; None if safe."""
        persistence = self._persistence_warning()
        if not self.evicts:
            return persistence
        eviction = (
            f"maxmemory-policy is {self.eviction!r}: Redis may evict the task lists it accepted"
            " once it reaches maxmemory; set `CONFIG SET maxmemory-policy noeviction` for the"
            " rollback window"
        )
        return f"{persistence}; and {eviction}" if persistence else eviction

    def _persistence_warning(self) -> str | None:
        fix = (
            "for the rollback window run `CONFIG SET appendonly yes` and `CONFIG SET appendfsync"
            " always` on Redis (and keep them in redis.conf)"
        )
        if self.level == "fsync-always":
            return None
        if self.level == "memory":
            return (
                "Redis keeps what it accepts in memory only (appendonly no): a Redis crash before"
                f" its next snapshot loses rolled-back tasks that RabbitMQ no longer has; {fix}"
            )
        if self.level == "unknown":
            return f"could not read Redis's persistence settings (CONFIG GET denied); {fix}"
        lost = "about a second" if self.appendfsync == "everysec" else "tens of seconds"
        return (
            f"Redis syncs its append-only file {self.appendfsync!r}, not per write: a crash of"
            f" its host can lose up to {lost} of rolled-back tasks; {fix}"
        )


def durability(store: RedisSource) -> Durability:
    """Read appendonly/appendfsync; "unknown" where CONFIG is not allowed."""
    import redis

    found: dict[str, str] = {}
    for name in ("appendonly", "appendfsync", "maxmemory-policy"):
        try:
            value = store.client.config_get(name).get(name)
        except redis.ResponseError:
            value = None
        found[name] = value.decode() if isinstance(value, bytes) else str(value or "unknown")
    return Durability(found["appendonly"], found["appendfsync"], found["maxmemory-policy"])


def _runs(messages: Sequence[RedisEntry]) -> list[tuple[str, list[bytes]]]:
    """Consecutive entries of one list, grouped (one LPUSH each, order kept)."""
    runs: list[tuple[str, list[bytes]]] = []
    for entry in messages:
        if runs and runs[-1][0] == entry.key:
            runs[-1][1].append(entry.payload)
        else:
            runs.append((entry.key, [entry.payload]))
    return runs
