"""The one driver: moves a lane of any source to any sink, batch by batch, losing nothing.

Two half batches in flight: the next is read, decoded and sent while the sink confirms the
previous one; only a fully settled batch at the source's consuming end is committed (removed).
At most `batch_size` messages are unconfirmed at any time (the confirm window, and so the most
a crash can duplicate). The in-flight journal always names every batch that is sent but not
yet committed (rewritten before each send and after each commit), so a crash at any instant
leaves every possible duplicate listed. Entries that cannot be decoded or encoded, and
messages the sink refused, are quarantined with their reason. A sink that fails mid-window
(a lost connection) leaves its unsettled batches uncommitted and journaled.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic

from packit_broker.messages import MalformedMessage
from packit_broker.migrate.protocols import Lane, Out, Rejection, Sink, Source, Ticket
from packit_broker.migrate.report import QuarantinedEntry, Report

Progress = Callable[[str, int], None]

#: A batch also closes at this many bytes of entries (at least one entry): memory follows the
#: bodies, not only their count. Two batches are in flight at most.
DEFAULT_BATCH_BYTES = 16 * 1024 * 1024
#: How many entries the first read of a lane takes, before their size is known.
FIRST_READ = 8


def within_bytes(entries: Sequence[bytes], budget: int) -> Sequence[bytes]:
    """The leading entries that fit in `budget` bytes (always the first): the rest stay in
    the source, read again by the next batch."""
    total = 0
    for index, entry in enumerate(entries):
        total += len(entry)
        if total > budget and index > 0:
            return entries[:index]
    return entries


@dataclass
class Batch(Generic[Out]):
    """One batch as read from the source and what became of each entry."""

    entries: Sequence[bytes]
    messages: list[Out] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # entry index of each message
    quarantine: list[int] = field(default_factory=list)  # indexes into `entries`
    reasons: list[str] = field(default_factory=list)
    refused: list[Rejection] = field(default_factory=list)
    sent_at: float = 0.0  # monotonic

    def refuse(self, refused: Sequence[Rejection]) -> None:
        """Messages the sink refused are quarantined with its reason; the rest is committed."""
        self.refused = list(refused)
        for refusal in refused:
            self.quarantine.append(self.positions[refusal.index])
            self.reasons.append(refusal.reason)


def _task_ids(batches: Iterable[Batch[Out]]) -> list[str]:
    return [task_id for batch in batches for task_id in batch.task_ids]


class Driver(Generic[Out]):
    """Moves lanes from `source` to `sink`, recording into `report`; `check` runs before every
    send (e.g. the run lock: a run that lost it must stop before sending more)."""

    def __init__(
        self,
        source: Source,
        sink: Sink[Out],
        report: Report,
        *,
        batch_size: int,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        progress: Progress | None = None,
        check: Callable[[], None] | None = None,
        stop: Callable[[], bool] | None = None,
        on_batch: Callable[[str, float], None] | None = None,
    ) -> None:
        self.source = source
        self.sink = sink
        self.report = report
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self._entry_bytes = 0  # the mean size of the entries last read; 0 before any
        self.progress = progress or (lambda queue, n: None)
        self.check = check or (lambda: None)
        self.stop = stop or (lambda: False)
        self.on_batch = on_batch or (lambda queue, seconds: None)

    def decode(self, entries: Sequence[bytes], lane: Lane) -> Batch[Out]:
        batch: Batch[Out] = Batch(entries)
        for index, raw in enumerate(entries):
            try:
                message = self.source.decode(raw, lane)
                batch.messages.append(self.sink.encode(message, lane.target))
            except MalformedMessage as exc:
                batch.quarantine.append(index)
                batch.reasons.append(exc.reason)
                continue
            batch.positions.append(index)
            if message.task_id:
                batch.task_ids.append(message.task_id)
        return batch

    def move(self, lane: Lane) -> int:
        """Move `lane` until the source has nothing more in it, or until `stop()` (then the
        batches in flight are finished: confirmed and committed); how many messages moved.

        If the sink fails (a lost connection, anything it raises), the batches in flight are
        abandoned, not committed: those the sink had already settled in full are committed
        first (in order, from the consuming end), the others stay in the source, still named
        by the journal, and the sink's error is raised. A caller that reconnects adopts the
        journal into the possible duplicates and moves the lane again from its consuming end.
        """
        depth = 2 if self.batch_size >= 2 else 1  # batches in flight
        size = self.batch_size // depth  # so at most batch_size are unconfirmed
        inflight: collections.deque[tuple[Batch[Out], Ticket]] = collections.deque()
        skip = 0  # entries sent and not yet committed, counted from the consuming end
        moved = 0
        while True:
            stopping = self.stop()
            entries = () if stopping else self._read(lane, skip, size, depth)
            batch: Batch[Out] = self.decode(entries, lane)
            if batch.entries:
                self.check()
                # Until the sink's own ticket replaces it, an unsettled placeholder: a batch
                # whose send failed half-way stays in flight (journaled, never committed).
                sending = len(batch.messages)
                inflight.append((batch, Ticket(sending, max(sending, 1))))
                self.source.mark_inflight(lane.key, _task_ids(b for b, _ in inflight))
                batch.sent_at = time.monotonic()
                try:
                    ticket = self.sink.send(batch.messages)
                except Exception:
                    self._salvage(lane, inflight)
                    raise
                inflight[-1] = (batch, ticket)
                skip += len(batch.entries)
            if not inflight:
                return moved
            if len(inflight) < depth and batch.entries:
                continue
            done, ticket = inflight[0]
            # If this wait fails, nothing is committed: the batch at the consuming end is not
            # settled, so no batch after it can be removed either.
            refused = self.sink.wait(ticket)
            inflight.popleft()
            moved += self._commit(lane, done, refused, inflight)
            skip -= len(done.entries)

    def _read(self, lane: Lane, skip: int, size: int, depth: int) -> Sequence[bytes]:
        """Up to `size` entries, as many as fit the byte budget by the sizes seen so far (a
        short first read learns them), then cut to the budget exactly."""
        budget = self.batch_bytes // depth
        if self._entry_bytes == 0:
            count = min(size, FIRST_READ)
        else:
            count = max(1, min(size, budget // self._entry_bytes))
        entries = self.source.read(lane, skip, count)
        if entries:
            self._entry_bytes = max(1, sum(len(e) for e in entries) // len(entries))
        return within_bytes(entries, budget)

    def _commit(
        self,
        lane: Lane,
        done: Batch[Out],
        refused: Sequence[Rejection],
        inflight: collections.deque[tuple[Batch[Out], Ticket]],
    ) -> int:
        """Commit a settled batch; rewrite the journal for the batches still in flight."""
        done.refuse(refused)
        self.on_batch(lane.target.name, time.monotonic() - done.sent_at)
        # The source re-checks that `done` is still at its consuming end before removing
        # it; the journal is kept (it still names the batch in flight) and rewritten.
        self.source.commit(lane, done.entries, done.quarantine, keep_marker=bool(inflight))
        if inflight:
            self.source.mark_inflight(lane.key, _task_ids(b for b, _ in inflight))
        self.report.quarantine.extend(QuarantinedEntry(lane.key, r) for r in done.reasons)
        count = len(done.messages) - len(done.refused)
        self.count(lane.target.name, count)
        return count

    def _salvage(
        self,
        lane: Lane,
        inflight: collections.deque[tuple[Batch[Out], Ticket]],
    ) -> None:
        """A send failed: commit the leading batches the sink had settled in full before
        (their confirms arrived; resending them would only make duplicates), and stop at the
        first one that is not - or that still has something to redo over the failed
        connection (e.g. nacked messages to publish again): that one stays in flight."""
        while inflight and inflight[0][1].final:
            done, ticket = inflight[0]
            try:
                refused = self.sink.wait(ticket)  # final: nothing to wait for, only reasons
            except Exception:
                return
            inflight.popleft()
            self._commit(lane, done, refused, inflight)

    def count(self, queue: str, count: int) -> None:
        self.report.migrated[queue] = self.report.migrated.get(queue, 0) + count
        self.progress(queue, count)
