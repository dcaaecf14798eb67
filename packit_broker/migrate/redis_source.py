"""I/O: reading Celery's Redis broker state, and removing entries only after RabbitMQ confirmed.

Nothing is popped before it is confirmed: a batch is *read* from the consuming end of a list
(the right), published, confirmed, and then removed by one Lua script that first checks the
entries are still exactly there. Quarantined entries move byte-exact in the same script. An
in-flight marker names the batch's task ids, so a rerun after a crash can list the only
messages that may now exist twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

PRIORITY_SEP = "\x06\x16"
QUARANTINE = "packit_broker.quarantine"
INFLIGHT = "packit_broker.inflight"
POSSIBLE_DUPLICATES = "packit_broker.possible_duplicates"
BLOCKING_COMMANDS = frozenset({"brpop", "blpop", "brpoplpush", "blmove", "bzpopmin", "bzpopmax"})

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

# KEYS: unacked, unacked_index, quarantine, inflight. ARGV: tags..., '--', quarantine tags...
_DROP_UNACKED = """
local quarantine = false
for i = 1, #ARGV do
  local tag = ARGV[i]
  if tag == '--' then quarantine = true
  else
    if quarantine then
      local value = redis.call('HGET', KEYS[1], tag)
      if value then redis.call('LPUSH', KEYS[3], value) end
    end
    redis.call('HDEL', KEYS[1], tag)
    redis.call('ZREM', KEYS[2], tag)
  end
end
redis.call('DEL', KEYS[4])
return 1
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


@dataclass(frozen=True)
class Keys:
    """Key names under kombu's optional `global_keyprefix`."""

    prefix: str = ""

    def queue(self, name: str, step: int) -> str:
        return self.prefix + (name if step == 0 else f"{name}{PRIORITY_SEP}{step}")

    @property
    def unacked(self) -> str:
        return self.prefix + "unacked"

    @property
    def unacked_index(self) -> str:
        return self.prefix + "unacked_index"

    @property
    def binding_pattern(self) -> str:
        return self.prefix + "_kombu.binding.*"

    def own(self, name: str) -> str:
        return self.prefix + name


@dataclass(frozen=True)
class UnackedEntry:
    tag: str
    value: bytes
    delivered_at: float | None


@dataclass(frozen=True)
class LiveConsumer:
    address: str
    name: str
    command: str
    idle: int

    def __str__(self) -> str:
        label = f" name={self.name}" if self.name else ""
        return f"{self.address}{label} cmd={self.command} (idle {self.idle}s)"


class RedisSource:
    """The Celery broker state in one Redis database."""

    def __init__(self, client: redis.Redis[bytes], db: int, keys: Keys | None = None) -> None:
        self.client = client
        self.db = db
        self.keys = keys or Keys()
        self._trim = client.register_script(_TRIM_LIST)
        self._drop_unacked = client.register_script(_DROP_UNACKED)
        self._adopt = client.register_script(_ADOPT_INFLIGHT)

    @classmethod
    def from_url(cls, url: str, keys: Keys | None = None) -> RedisSource:
        client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
        db = int(client.connection_pool.connection_kwargs.get("db", 0))
        return cls(client, db, keys)

    # -- discovery -----------------------------------------------------------------------

    def bound_queues(self) -> dict[str, set[tuple[str, str]]]:
        """queue -> {(exchange, routing_key)} from kombu's `_kombu.binding.*` sets."""
        found: dict[str, set[tuple[str, str]]] = {}
        prefix_len = len(self.keys.own("_kombu.binding."))
        for key in self.client.scan_iter(match=self.keys.binding_pattern, count=500):
            exchange = key.decode(errors="replace")[prefix_len:]
            for member in self.client.smembers(key):
                parts = member.decode(errors="replace").split(PRIORITY_SEP)
                if len(parts) == 3:
                    found.setdefault(parts[2], set()).add((exchange, parts[0]))
        return found

    def list_queues(self) -> set[str]:
        """Lists that hold kombu envelopes (their priority suffix stripped)."""
        names: set[str] = set()
        own = self.keys.own("packit_broker.")
        for key in self.client.scan_iter(match=self.keys.prefix + "*", count=500, _type="list"):
            text = key.decode(errors="replace")
            if text.startswith(own) or not text.startswith(self.keys.prefix):
                continue
            base = text[len(self.keys.prefix) :].split(PRIORITY_SEP)[0]
            if base not in names and any(
                map(_looks_like_envelope, self.client.lrange(key, -10, -1))
            ):
                names.add(base)
        return names

    def length(self, queue: str, step: int) -> int:
        return int(self.client.llen(self.keys.queue(queue, step)))

    # -- reading ---------------------------------------------------------------------------

    def oldest(self, queue: str, step: int, count: int) -> list[bytes]:
        """Up to `count` entries from the consuming end, oldest first; nothing is removed."""
        tail: list[bytes] = self.client.lrange(self.keys.queue(queue, step), -count, -1)
        tail.reverse()
        return tail

    def unacked(self) -> list[UnackedEntry]:
        """Every `unacked` entry, oldest delivery first (entries missing from the index last)."""
        scores = {
            tag.decode(): float(score)
            for tag, score in self.client.zrange(self.keys.unacked_index, 0, -1, withscores=True)
        }
        entries = [
            UnackedEntry(tag.decode(errors="surrogateescape"), value, scores.get(tag.decode()))
            for tag, value in self.client.hgetall(self.keys.unacked).items()
        ]
        entries.sort(key=lambda e: (e.delivered_at is None, e.delivered_at or 0.0, e.tag))
        return entries

    # -- the in-flight marker ------------------------------------------------------------------

    def mark_inflight(self, source: str, task_ids: Sequence[str]) -> None:
        payload = json.dumps({"source": source, "ids": list(task_ids), "at": time.time()})
        self.client.set(self.keys.own(INFLIGHT), payload)

    def adopt_crashed_inflight(self) -> int:
        """Move a previous run's in-flight ids to the possible-duplicates list."""
        keys = [self.keys.own(INFLIGHT), self.keys.own(POSSIBLE_DUPLICATES)]
        return int(self._adopt(keys=keys, args=[]))

    def possible_duplicates(self) -> list[str]:
        raw = self.client.lrange(self.keys.own(POSSIBLE_DUPLICATES), 0, -1)
        return [item.decode(errors="replace") for item in raw]

    def clear_possible_duplicates(self) -> None:
        self.client.delete(self.keys.own(POSSIBLE_DUPLICATES))

    # -- removal after confirmation --------------------------------------------------------

    def remove_confirmed(
        self,
        queue: str,
        step: int,
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
        marker = self.keys.own(INFLIGHT + (".kept" if keep_marker else ""))
        keys = [self.keys.queue(queue, step), self.keys.own(QUARANTINE), marker]
        self._trim(keys=keys, args=args)

    def remove_unacked(self, confirmed: Sequence[str], quarantine: Sequence[str]) -> None:
        keys = [
            self.keys.unacked,
            self.keys.unacked_index,
            self.keys.own(QUARANTINE),
            self.keys.own(INFLIGHT),
        ]
        self._drop_unacked(keys=keys, args=[*confirmed, "--", *quarantine])

    # -- live consumers ---------------------------------------------------------------------

    def live_consumers(self) -> list[LiveConsumer]:
        """Clients of this database blocked in a pop: a Celery worker still consuming."""
        found = []
        for client in self.client.client_list():
            if int(client.get("db", -1)) != self.db:
                continue
            command = str(client.get("cmd", "")).lower()
            if command in BLOCKING_COMMANDS:
                found.append(
                    LiveConsumer(
                        address=str(client.get("addr", "?")),
                        name=str(client.get("name", "")),
                        command=command,
                        idle=int(client.get("idle", 0)),
                    )
                )
        return found

    def fresh_unacked(self, within_seconds: float) -> int:
        """How many `unacked` entries were delivered in the last `within_seconds`."""
        now = time.time()
        return int(self.client.zcount(self.keys.unacked_index, now - within_seconds, "+inf"))

    def following(self, queue: str, step: int, skip: int, count: int) -> list[bytes]:
        """The `count` entries after the `skip` oldest ones, oldest first (a read-ahead)."""
        tail: list[bytes] = self.client.lrange(
            self.keys.queue(queue, step), -(skip + count), -(skip + 1)
        )
        tail.reverse()
        return tail


def _looks_like_envelope(raw: bytes) -> bool:
    try:
        value = json.loads(raw)
    except ValueError:
        return False
    return isinstance(value, dict) and "properties" in value and "body" in value
