"""I/O: reading Celery's Redis broker state, and removing entries only after RabbitMQ confirmed.

Nothing is popped before it is confirmed: a batch is *read* from the consuming end of a list
(the right), published, confirmed, and then removed by one Lua script that first checks the
entries are still exactly there. Quarantined entries move byte-exact in the same script. An
in-flight marker names the batch's task ids, so a rerun after a crash can list the only
messages that may now exist twice. Every kombu key name comes from one `KombuLayout`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from packit_broker.codecs import from_redis
from packit_broker.config import redis_from_url
from packit_broker.kombu_layout import (
    BINDING_PREFIX,
    KombuLayout,
    control_reason,
    glob_escape,
    guess_sep,
)
from packit_broker.messages import TaskMessage
from packit_broker.migrate.protocols import Lane
from packit_broker.migrate.report import POSSIBLE_DUPLICATES, Report

QUARANTINE = "packit_broker.quarantine"
INFLIGHT = "packit_broker.inflight"
LOCK = "packit_broker.lock"
OWN_PREFIX = "packit_broker."
CLIENT_NAME = "packit-broker-migrate"
BLOCKING_COMMANDS = frozenset({"brpop", "blpop", "brpoplpush", "blmove", "bzpopmin", "bzpopmax"})
#: Commands only a kombu *consumer* sends (taking, acking, restoring: pops, MULTI/EXEC around
#: the unacked hash, the unacked_mutex's Lua release, the restore sweep's ZRANGE). Producers
#: send LPUSH/SADD/SMEMBERS, which are not here.
CONSUMER_COMMANDS = BLOCKING_COMMANDS | frozenset(
    {
        "rpop",
        "lpop",
        "rpoplpush",
        "lmove",
        "eval",
        "evalsha",
        "multi",
        "exec",
        "zrange",
        "zrangebyscore",
        "zrevrangebyscore",
        "hdel",
        "zrem",
    }
)
SAMPLE = 10  # envelopes looked at per list to recognise kombu's lists and their priorities

# KEYS: list, quarantine, inflight. ARGV: n, then the SHA-1 of the n expected entries (oldest
# first), then the 1-based positions (among those) to quarantine. Digests instead of the
# entries themselves: the check stays exact while the batch crosses the wire only once.
_TRIM_LIST = """
local n = tonumber(ARGV[1])
local tail = redis.call('LRANGE', KEYS[1], -n, -1)
if #tail ~= n then return redis.error_reply('packit: list changed under the migrator') end
for i = 1, n do
  if redis.sha1hex(tail[n - i + 1]) ~= ARGV[1 + i] then
    return redis.error_reply('packit: list changed under the migrator')
  end
end
for i = 2 + n, #ARGV do
  redis.call('LPUSH', KEYS[2], tail[n - tonumber(ARGV[i]) + 1])
end
redis.call('LTRIM', KEYS[1], 0, -(n + 1))
redis.call('DEL', KEYS[3])
return n
"""

# KEYS: unacked, unacked_index, quarantine, inflight. ARGV: triples (m|q, tag, SHA-1 of the
# value read). An entry is removed (or quarantined) only if its value is still the one read;
# the tags of the others are returned.
_DROP_UNACKED = """
local changed = {}
for i = 1, #ARGV, 3 do
  local tag = ARGV[i + 1]
  local value = redis.call('HGET', KEYS[1], tag)
  if value and redis.sha1hex(value) == ARGV[i + 2] then
    if ARGV[i] == 'q' then redis.call('LPUSH', KEYS[3], value) end
    redis.call('HDEL', KEYS[1], tag)
    redis.call('ZREM', KEYS[2], tag)
  else
    changed[#changed + 1] = tag
  end
end
redis.call('DEL', KEYS[4])
return changed
"""

# KEYS: inflight, possible_duplicates. Move a crashed run's in-flight ids into the list.
_ADOPT_INFLIGHT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ids = cjson.decode(raw)['ids']
for i = 1, #ids do redis.call('RPUSH', KEYS[2], ids[i]) end
redis.call('DEL', KEYS[1])
return #ids
"""

# KEYS: a list. ARGV: the entries a written report lists, in order. Dropped only if the list
# still starts with exactly them (a run that started meanwhile may have trimmed or appended).
_FORGET_REPORTED = """
local n = #ARGV
if n == 0 then return 1 end
local head = redis.call('LRANGE', KEYS[1], 0, n - 1)
if #head ~= n then return 0 end
for i = 1, n do
  if head[i] ~= ARGV[i] then return 0 end
end
redis.call('LTRIM', KEYS[1], n, -1)
return 1
"""

# KEYS: lock. ARGV: new value, ttl ms, the value to replace ('' = only if absent).
_TAKE_LOCK = """
local current = redis.call('GET', KEYS[1])
if (not current and ARGV[3] == '') or (current and current == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: lock. ARGV: owner, ttl ms ('0' = release). Renew or release only our own lock.
_KEEP_LOCK = """
local current = redis.call('GET', KEYS[1])
if not current or cjson.decode(current)['owner'] ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


@dataclass(frozen=True)
class UnackedEntry:
    tag: str
    value: bytes
    delivered_at: float | None

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.value).hexdigest()


@dataclass(frozen=True)
class LiveConsumer:
    address: str
    name: str
    command: str
    idle: int

    def __str__(self) -> str:
        label = f" name={self.name}" if self.name else ""
        return f"{self.address}{label} cmd={self.command} (idle {self.idle}s)"


@dataclass
class Survey:
    """What the source database holds, read once before anything is planned or moved."""

    bindings: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    list_queues: set[str] = field(default_factory=set)
    skipped: dict[str, str] = field(default_factory=dict)  # control traffic: name -> why
    mismatches: list[str] = field(default_factory=list)  # another layout's keys: why
    foreign_prefixes: set[str] = field(default_factory=set)
    wrong_type: dict[str, str] = field(default_factory=dict)  # key -> its Redis type


class LockHeld(RuntimeError):
    """Another migrator holds the run lock; `holder` says who."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class LockLost(RuntimeError):
    """Our run lock was taken over or could not be renewed: stop before the next batch."""


class MutexBusy(RuntimeError):
    """kombu's unacked_mutex is held: a Redis worker is restoring unacked entries right now."""


class RedisSource:
    """The Celery broker state in one Redis database, in the layout `layout`."""

    def __init__(self, client: redis.Redis[bytes], db: int, layout: KombuLayout) -> None:
        self.client = client
        self.db = db
        self.layout = layout
        self._trim = client.register_script(_TRIM_LIST)
        self._drop_unacked = client.register_script(_DROP_UNACKED)
        self._adopt = client.register_script(_ADOPT_INFLIGHT)
        self._forget = client.register_script(_FORGET_REPORTED)

    @classmethod
    def from_url(cls, url: str, layout: KombuLayout) -> RedisSource:
        """Parsed by packit_broker.config, not redis-py's from_url: no password in errors."""
        endpoint = redis_from_url(url)
        client = redis.Redis(
            **endpoint.client_kwargs(),
            socket_timeout=30,
            socket_connect_timeout=10,
            client_name=CLIENT_NAME,
            # Never resend a command whose reply was lost: redis-py (6+) would run a MULTI/EXEC
            # or a trim script twice - a rolled-back batch written twice with its journal
            # gone, or a removal reported as "list changed". A lost reply fails the run
            # instead, and the journal written with the batch lists it.
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, endpoint.db, layout)

    def own(self, name: str) -> str:
        return self.layout.key(name)

    # -- discovery -----------------------------------------------------------------------

    def survey(self) -> Survey:
        found = Survey()
        self._survey_bindings(found)
        self._survey_lists(found)
        self._survey_unacked_hashes(found)
        return found

    def _survey_bindings(self, found: Survey) -> None:
        keys = [k.decode(errors="surrogateescape") for k in self._scan("*" + BINDING_PREFIX + "*")]
        types = self.types(keys)
        own_keys = []
        for key in keys:
            prefix = key[: key.index(BINDING_PREFIX)]
            if prefix != self.layout.global_keyprefix:
                found.foreign_prefixes.add(prefix)
            elif types[key] != "set":
                found.wrong_type[key] = types[key]
            else:
                own_keys.append(key)
        pipe = self.client.pipeline(transaction=False)
        for key in own_keys:
            pipe.smembers(key)
        offset = len(self.layout.key(BINDING_PREFIX))
        for key, members in zip(own_keys, pipe.execute(), strict=True):
            exchange = key[offset:]
            for raw in members:
                self._binding(found, key, exchange, raw.decode(errors="replace"))

    def _binding(self, found: Survey, key: str, exchange: str, member: str) -> None:
        parts = self.layout.split_binding(member)
        if parts is None:
            sep = _guess_binding_sep(member)
            hint = f' (it looks like "sep": {json.dumps(sep)})' if sep else ""
            found.mismatches.append(
                f"binding {member!r} in {key!r} does not split into routing key, pattern and"
                f" queue by sep={self.layout.sep!r}: set sep as the app does{hint}"
            )
            return
        routing_key, _, queue = parts
        reason = control_reason(exchange, queue)
        if reason:
            found.skipped[queue] = reason
        else:
            found.bindings.setdefault(queue, set()).add((exchange, routing_key))

    def _survey_lists(self, found: Survey) -> None:
        keys = [
            k.decode(errors="surrogateescape")
            for k in self._scan(self.layout.list_pattern, "list")
            if not k.decode(errors="replace").startswith(self.own(OWN_PREFIX))
        ]
        keys = [k for k in keys if not any(k.startswith(p) for p in found.foreign_prefixes if p)]
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.lrange(key, -SAMPLE, -1)
        for key, sample in zip(keys, pipe.execute(), strict=True):
            parsed = self.layout.parse_list_key(key)
            envelopes = [e for e in map(_envelope, sample) if e is not None]
            if parsed is None or not envelopes:
                continue
            queue, step = parsed
            reason = control_reason(None, queue)
            if reason:
                found.skipped[queue] = reason
                continue
            foreign = self.layout.foreign_bucket(key)
            if foreign is None:
                foreign = self._priority_mismatch(key, step, envelopes)
            if foreign is not None:
                found.mismatches.append(f"list {key!r} {foreign}")
                continue
            found.list_queues.add(queue)

    def _priority_mismatch(
        self, key: str, step: int, envelopes: list[dict[str, Any]]
    ) -> str | None:
        """A list whose messages kombu, with this layout, would have filed elsewhere."""
        for envelope in envelopes:
            priority = _envelope_priority(envelope)
            expected = self.layout.bucket_of(priority)
            if expected != step:
                sep = guess_sep(key[len(self.layout.global_keyprefix) :])
                hint = f' (the name suggests "sep": {json.dumps(sep)})' if sep and step == 0 else ""
                return (
                    f"holds priority-{priority} messages, which this layout files in bucket"
                    f" {expected}, not {step}: set sep/priority_steps as the app does{hint}"
                )
        return None

    def _survey_unacked_hashes(self, found: Survey) -> None:
        """`<prefix>unacked` hashes of another global_keyprefix."""
        name = self.layout.unacked_key
        for raw in self._scan("*" + glob_escape(name), "hash"):
            key = raw.decode(errors="surrogateescape")
            prefix = key[: -len(name)]
            if prefix != self.layout.global_keyprefix:
                found.foreign_prefixes.add(prefix)

    def _scan(self, pattern: str, kind: str | None = None) -> Iterator[bytes]:
        if kind is None:
            yield from self.client.scan_iter(match=pattern, count=1000)
        else:
            yield from self.client.scan_iter(match=pattern, count=1000, _type=kind)

    def types(self, keys: Sequence[str]) -> dict[str, str]:
        """key -> Redis type ('none' if absent), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        return {
            key: (kind.decode() if isinstance(kind, bytes) else str(kind))
            for key, kind in zip(keys, pipe.execute(), strict=True)
        }

    def lengths(self, keys: Sequence[str]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        return [int(n) for n in pipe.execute()]

    # -- reading ---------------------------------------------------------------------------

    def oldest(self, key: str, count: int) -> list[bytes]:
        """Up to `count` entries from the consuming end, oldest first; nothing is removed."""
        tail: list[bytes] = self.client.lrange(key, -count, -1)
        tail.reverse()
        return tail

    def following(self, key: str, skip: int, count: int) -> list[bytes]:
        """The `count` entries after the `skip` oldest ones, oldest first (a read-ahead)."""
        tail: list[bytes] = self.client.lrange(key, -(skip + count), -(skip + 1))
        tail.reverse()
        return tail

    # -- the driver's seam (packit_broker.migrate.protocols.Source) -------------------------

    def read(self, lane: Lane, skip: int, count: int) -> list[bytes]:
        return self.following(lane.key, skip, count)

    def decode(self, raw: bytes, lane: Lane) -> TaskMessage:
        return from_redis(raw, self.layout)

    def commit(
        self, lane: Lane, entries: Sequence[bytes], quarantine: Sequence[int], *, keep_marker: bool
    ) -> None:
        self.remove_confirmed(lane.key, entries, quarantine, keep_marker=keep_marker)

    def has_unacked(self) -> bool:
        """Whether kombu's `unacked` hash holds anything (one cheap HLEN, not HGETALL)."""
        return bool(self.client.hlen(self.layout.unacked))

    def unacked(self) -> list[UnackedEntry]:
        """Every `unacked` entry, oldest delivery first (entries missing from the index last)."""
        scores = {
            tag.decode(): float(score)
            for tag, score in self.client.zrange(self.layout.unacked_index, 0, -1, withscores=True)
        }
        entries = [
            UnackedEntry(tag.decode(errors="surrogateescape"), value, scores.get(tag.decode()))
            for tag, value in self.client.hgetall(self.layout.unacked).items()
        ]
        entries.sort(key=lambda e: (e.delivered_at is None, e.delivered_at or 0.0, e.tag))
        return entries

    # -- the in-flight marker ------------------------------------------------------------------

    def mark_inflight(self, source: str, task_ids: Sequence[str]) -> None:
        self.client.set(self.own(INFLIGHT), inflight_payload(source, task_ids))

    def adopt_crashed_inflight(self) -> int:
        """Move a previous run's in-flight ids to the possible-duplicates list."""
        keys = [self.own(INFLIGHT), self.own(POSSIBLE_DUPLICATES)]
        return int(self._adopt(keys=keys, args=[]))

    def add_possible_duplicates(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            self.client.rpush(self.own(POSSIBLE_DUPLICATES), *task_ids)

    def possible_duplicates(self) -> list[str]:
        return self.listed(POSSIBLE_DUPLICATES)

    def listed(self, name: str) -> list[str]:
        """One of our id lists (POSSIBLE_DUPLICATES, REDELIVERED), oldest first."""
        raw = self.client.lrange(self.own(name), 0, -1)
        return [item.decode(errors="replace") for item in raw]

    def forget_reported(self, name: str, reported: Sequence[str]) -> bool:
        """Drop the ids a written report lists from the head of list `name`, only if it still
        starts with exactly them: a run that began after ours released the lock may already
        have trimmed or appended (then they stay, and are reported again: never lost)."""
        return bool(self._forget(keys=[self.own(name)], args=list(reported)))

    # -- removal after confirmation --------------------------------------------------------

    def remove_confirmed(
        self,
        key: str,
        entries: Sequence[bytes],
        quarantine: Sequence[int],
        *,
        keep_marker: bool = False,
    ) -> None:
        """Remove `entries` (as returned by `oldest`); move those at `quarantine` indexes.

        `keep_marker`: another batch is still in flight, so the in-flight marker stays (the
        caller rewrites it) instead of being deleted with the removal."""
        digests = [hashlib.sha1(entry).hexdigest() for entry in entries]
        args: list[Any] = [len(entries), *digests, *(i + 1 for i in quarantine)]
        # The script deletes the marker key it is given: a kept marker is spared by naming a
        # key that does not exist instead.
        marker = self.own(INFLIGHT + (".kept" if keep_marker else ""))
        self._trim(keys=[key, self.own(QUARANTINE), marker], args=args)

    def remove_unacked(
        self, confirmed: Sequence[UnackedEntry], quarantine: Sequence[UnackedEntry]
    ) -> list[str]:
        """Remove entries whose value is still the one read; the tags of the others."""
        args: list[str] = []
        for kind, entries in (("m", confirmed), ("q", quarantine)):
            for entry in entries:
                args.extend((kind, entry.tag, entry.digest))
        keys = [
            self.layout.unacked,
            self.layout.unacked_index,
            self.own(QUARANTINE),
            self.own(INFLIGHT),
        ]
        changed = self._drop_unacked(keys=keys, args=args)
        return [t.decode(errors="surrogateescape") for t in changed]

    @contextmanager
    def unacked_mutex(self, wait: float = 10.0) -> Iterator[Any]:
        """Hold kombu's `unacked_mutex`, as its restore sweep does, so no Redis worker restores
        an entry while it is being moved; MutexBusy if a worker keeps it."""
        lock = self.client.lock(self.layout.unacked_mutex, timeout=self.layout.unacked_mutex_expire)
        if not lock.acquire(blocking=True, blocking_timeout=wait):
            raise MutexBusy(
                f"kombu's {self.layout.unacked_mutex!r} is held: a Redis worker is restoring"
                " unacked entries; stop every Celery worker that uses this Redis"
            )
        try:
            yield lock
        finally:
            with suppress(redis.exceptions.LockError):
                lock.release()

    # -- live consumers ---------------------------------------------------------------------

    def live_consumers(self, recent_seconds: float) -> list[LiveConsumer]:
        """Clients of this database that consume like a kombu worker: blocked in a pop,
        subscribed (a worker's remote-control channel), or sent a consumer-only command in the
        last `recent_seconds` (a worker whose prefetch is full is not blocked)."""
        found = []
        for client in self.client.client_list():
            if int(client.get("db", -1)) != self.db or _ours(str(client.get("name", ""))):
                continue
            command = str(client.get("cmd", "")).lower()
            idle = int(client.get("idle", 0))
            subscribed = int(client.get("sub", 0) or 0) + int(client.get("psub", 0) or 0) > 0
            recent = command in CONSUMER_COMMANDS and idle <= recent_seconds
            if command in BLOCKING_COMMANDS or subscribed or recent:
                found.append(
                    LiveConsumer(
                        address=str(client.get("addr", "?")),
                        name=str(client.get("name", "")),
                        command=command,
                        idle=idle,
                    )
                )
        return found

    def fresh_unacked(self, within_seconds: float) -> int:
        """How many `unacked` entries were delivered in the last `within_seconds`."""
        now = time.time()
        return int(self.client.zcount(self.layout.unacked_index, now - within_seconds, "+inf"))


#: How often the holder renews the run lock (seconds, at most: a third of its expiry when
#: that is shorter); also how soon a holder whose connection dropped is connected again.
LOCK_RENEW_SECONDS = 1.0
#: A holder with no live connection is taken over only if it still has none this much later:
#: a live holder whose connection dropped (CLIENT KILL, a Redis restart or failover) has
#: reconnected by then, under the same client name.
TAKEOVER_CONFIRM_SECONDS = 3 * LOCK_RENEW_SECONDS


def _ours(name: str) -> bool:
    """Whether a client name is one of packit-broker's own connections (never a consumer)."""
    return name == CLIENT_NAME or name.startswith(CLIENT_NAME + ".")


class RunLock:
    """One migrator per Redis database: a key with owner and expiry, renewed while running.

    The holder is known by its connection's client name (the owner string, which redis-py
    sends again on every reconnect), not by a client id that a reconnect changes. A lock
    whose holder has no connection for TAKEOVER_CONFIRM_SECONDS (a SIGKILLed run), or whose
    expiry passed, is taken over; one whose holder is connected is not.
    """

    def __init__(self, source: RedisSource, ttl: float = 30.0) -> None:
        pool = source.client.connection_pool
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.client_name = f"{CLIENT_NAME}.lock:{self.owner}"
        self.client: redis.Redis[bytes] = redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class,
                **{**pool.connection_kwargs, "client_name": self.client_name},
            ),
            single_connection_client=True,
        )
        self.key = source.own(LOCK)
        self.ttl_ms = int(ttl * 1000)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._take = self.client.register_script(_TAKE_LOCK)
        self._keep = self.client.register_script(_KEEP_LOCK)

    def _value(self) -> str:
        return json.dumps(
            {
                "owner": self.owner,
                "client_name": self.client_name,
                "client_id": self.client.client_id(),
                "since": time.time(),
            }
        )

    def acquire(self) -> str | None:
        """Take the lock; the holder taken over from (a crashed run), or None. LockHeld if a
        live run holds it."""
        value = self._value()
        if self._take(keys=[self.key], args=[value, self.ttl_ms, ""]):
            return None
        current = self.client.get(self.key)
        if current is None:
            return self.acquire()
        holder = json.loads(current)
        if self._connected(holder):
            raise self._held(holder)
        time.sleep(TAKEOVER_CONFIRM_SECONDS)  # a live holder reconnects within this
        if self.client.get(self.key) != current:
            return self.acquire()  # renewed, released or taken meanwhile: judge it again
        if self._connected(holder):
            raise self._held(holder)
        if not self._take(keys=[self.key], args=[value, self.ttl_ms, current]):
            return self.acquire()
        return str(holder.get("owner"))

    def _connected(self, holder: dict[str, Any]) -> bool:
        """Whether the holder has a connection: by client name (older runs: by client id)."""
        clients = self.client.client_list()
        name = holder.get("client_name")
        if name:
            return name in {c.get("name") for c in clients}
        return holder.get("client_id") in {int(c["id"]) for c in clients}

    def _held(self, holder: dict[str, Any]) -> LockHeld:
        ttl = self.client.pttl(self.key)
        return LockHeld(
            f"{holder.get('owner')} (running since {time.ctime(holder.get('since', 0))},"
            f" lock expires in {max(ttl, 0) / 1000:.0f}s unless renewed)"
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="packit-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        interval = min(self.ttl_ms / 3000, LOCK_RENEW_SECONDS)
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                if not self._keep(keys=[self.key], args=[self.owner, self.ttl_ms]):
                    self.lost = True
                    return
                last_ok = time.monotonic()
            except redis.RedisError:
                if time.monotonic() - last_ok > self.ttl_ms / 1000:
                    self.lost = True
                    return

    def check(self) -> None:
        if self.lost:
            raise LockLost(
                f"the run lock {self.key!r} was lost (taken over or not renewable): stopped"
                " before the next batch"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self._keep(keys=[self.key], args=[self.owner, 0])
        finally:
            self.close()

    def close(self) -> None:
        """Drop the lock's connection (a holder whose connection is gone counts as dead)."""
        self.client.close()
        self.client.connection_pool.disconnect()


def inflight_payload(source: str, task_ids: Sequence[str]) -> str:
    """The in-flight journal's value (what `adopt_crashed_inflight` reads back), in whichever
    direction Redis is the side that keeps the journal."""
    return json.dumps({"source": source, "ids": list(task_ids), "at": time.time()})


def _envelope(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, dict) and "properties" in value and "body" in value:
        return value
    return None


def _envelope_priority(envelope: dict[str, Any]) -> int:
    """The priority kombu's `_get_message_priority` reads (`int()` of it, else 0)."""
    try:
        return int(envelope["properties"]["priority"])
    except (TypeError, ValueError, KeyError, OverflowError):
        return 0


def _guess_binding_sep(member: str) -> str | None:
    """`q::q` -> ':' (routing key, an empty pattern and the queue, joined by one separator)."""
    for size in range(1, 4):
        for start in range(1, len(member) - 2 * size + 1):
            sep = member[start : start + size]
            parts = member.split(sep)
            if len(parts) == 3 and parts[0] == parts[2] and not parts[1]:
                return sep
    return None


@contextmanager
def locked_run(store: RedisSource, report: Report, ttl: float) -> Iterator[RunLock]:
    """The run lock held around a run (either direction: the lock and the journal live in the
    Redis database either way), and the report begun as every run begins it: whose crashed
    run was taken over, and that run's in-flight ids adopted as possible duplicates."""
    lock = RunLock(store, ttl)
    try:
        report.taken_over_from = lock.acquire()
        lock.start()
        store.adopt_crashed_inflight()
        report.possible_duplicates = store.possible_duplicates()
        report.adopted_duplicates = len(report.possible_duplicates)
        yield lock
    finally:
        lock.release()
