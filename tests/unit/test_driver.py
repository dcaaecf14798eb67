"""The driver's bookkeeping with an in-memory source and sink (the wire is tested on the rig)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from packit_broker.messages import MalformedMessage, TaskMessage
from packit_broker.migrate.driver import Driver
from packit_broker.migrate.protocols import Lane, Rejection, Ticket
from packit_broker.migrate.report import Report
from packit_broker.queues import QueueSpec

LANE = Lane("q", QueueSpec("q"))


class ListSource:
    """A list consumed from the end, with a journal of what is in flight."""

    def __init__(self, entries: list[bytes]) -> None:
        self.entries = list(reversed(entries))  # producing end first, as LPUSH leaves it
        self.journal: list[str] = []
        self.quarantined: list[bytes] = []

    def read(self, lane: Lane, skip: int, count: int) -> list[bytes]:
        end = len(self.entries) - skip
        return list(reversed(self.entries[max(0, end - count) : max(0, end)]))

    def decode(self, raw: bytes, lane: Lane) -> TaskMessage:
        if not raw.startswith(b"{"):
            raise MalformedMessage("not JSON")
        return TaskMessage(body=raw, headers={"id": json.loads(raw)["id"], "task": "t"})

    def mark_inflight(self, where: str, task_ids: Sequence[str]) -> None:
        self.journal = list(task_ids)

    def commit(
        self, lane: Lane, entries: Sequence[bytes], quarantine: Sequence[int], *, keep_marker: bool
    ) -> None:
        assert list(reversed(self.entries[-len(entries) :])) == list(entries), "not the tail"
        self.quarantined.extend(entries[i] for i in quarantine)
        del self.entries[-len(entries) :]
        if not keep_marker:
            self.journal = []


class RecordingSink:
    """Takes everything but the poison; checks the journal and the window on every send."""

    def __init__(self, source: ListSource, window: int) -> None:
        self.source = source
        self.window = window
        self.delivered: list[str] = []
        self.unconfirmed: list[str] = []
        self.tickets: list[tuple[Ticket, list[TaskMessage]]] = []

    def prepare(self, target: QueueSpec) -> None:
        pass

    def encode(self, message: TaskMessage, target: QueueSpec) -> TaskMessage:
        return message

    def send(self, messages: Sequence[TaskMessage]) -> Ticket:
        ids = [str(m.task_id) for m in messages]
        self.unconfirmed.extend(ids)
        assert len(self.unconfirmed) <= self.window
        assert set(self.unconfirmed) <= set(self.source.journal), "in flight but not journaled"
        ticket = Ticket(len(messages), len(messages))
        self.tickets.append((ticket, list(messages)))
        return ticket

    def wait(self, ticket: Ticket) -> list[Rejection]:
        (sent, messages) = self.tickets.pop(0)
        assert sent is ticket, "settled out of order"
        refused = []
        for index, message in enumerate(messages):
            self.unconfirmed.remove(str(message.task_id))
            if b"poison" in message.body:
                refused.append(Rejection(index, "nacked by the broker"))
            else:
                self.delivered.append(str(message.task_id))
        return refused


def entries(n: int) -> list[bytes]:
    return [json.dumps({"id": f"t{i}"}).encode() for i in range(n)]


def test_moves_everything_in_order_within_the_window_and_journaled() -> None:
    for batch_size in (1, 2, 7, 100):
        source = ListSource(entries(45))
        sink = RecordingSink(source, window=batch_size)
        report = Report()
        moved = Driver(source, sink, report, batch_size=batch_size).move(LANE)
        assert moved == 45 and report.migrated == {"q": 45}
        assert sink.delivered == [f"t{i}" for i in range(45)]
        assert source.entries == [] and source.journal == []


def test_malformed_and_refused_are_quarantined_with_their_reason() -> None:
    raw = entries(10)
    raw[3] = b"garbage"
    raw[6] = json.dumps({"id": "t6", "poison": 1}).encode()
    source = ListSource(raw)
    sink = RecordingSink(source, window=4)
    report = Report()
    assert Driver(source, sink, report, batch_size=4).move(LANE) == 8
    assert sorted(source.quarantined) == sorted([raw[3], raw[6]])
    assert sorted(q.reason for q in report.quarantine) == ["nacked by the broker", "not JSON"]
    assert "t6" not in sink.delivered and len(sink.delivered) == 8


def test_check_runs_before_every_send_and_stops_the_move() -> None:
    source = ListSource(entries(10))
    sink = RecordingSink(source, window=2)
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("lock lost")

    with pytest.raises(RuntimeError, match="lock lost"):
        Driver(source, sink, Report(), batch_size=2, check=check).move(LANE)
    assert len(sink.unconfirmed) + len(sink.delivered) == 2  # nothing sent after the failure
    assert set(sink.unconfirmed) <= set(source.journal)


class LosingSink(RecordingSink):
    """Settles each batch as soon as it is sent (its confirms arrived), then loses the
    connection on send number `lose_at` (1-based), after publishing half of that batch."""

    def __init__(self, source: ListSource, window: int, lose_at: int) -> None:
        super().__init__(source, window)
        self.lose_at = lose_at
        self.sends = 0
        self.published: list[str] = []  # what reached the broker, confirmed or not

    def send(self, messages: Sequence[TaskMessage]) -> Ticket:
        self.sends += 1
        if self.sends == self.lose_at:
            self.published.extend(str(m.task_id) for m in messages[: len(messages) // 2])
            raise ConnectionResetError("connection lost")
        ticket = super().send(messages)
        self.published.extend(str(m.task_id) for m in messages)
        ticket.outstanding = 0  # confirmed at once
        return ticket


def test_a_lost_send_commits_only_what_was_confirmed_and_journals_the_rest() -> None:
    """Batch 1 confirmed, batch 2's send fails half-way: batch 1 is committed (no needless
    duplicate), batch 2 stays in the source, named by the journal - never removed."""
    source = ListSource(entries(20))
    sink = LosingSink(source, window=8, lose_at=2)
    report = Report()
    with pytest.raises(ConnectionResetError):
        Driver(source, sink, report, batch_size=8).move(LANE)
    assert report.migrated == {"q": 4}  # batch 1 (half of the window) committed
    assert len(source.entries) == 16  # batch 2 and the rest still in the source
    assert source.journal == ["t4", "t5", "t6", "t7"]  # exactly the batch in doubt
    assert set(sink.published) - {f"t{i}" for i in range(4)} <= set(source.journal)


def test_a_failed_wait_commits_nothing_in_flight() -> None:
    source = ListSource(entries(20))
    sink = RecordingSink(source, window=8)
    report = Report()

    def lost(ticket: Ticket) -> list[Rejection]:
        raise ConnectionResetError("connection lost")

    sink.wait = lost  # type: ignore[method-assign]
    with pytest.raises(ConnectionResetError):
        Driver(source, sink, report, batch_size=8).move(LANE)
    assert report.migrated == {} and len(source.entries) == 20
    assert set(sink.unconfirmed) == set(source.journal) == {f"t{i}" for i in range(8)}


class NackedTicket(Ticket):
    """A ticket settled by the broker, but with nacked messages the sink must publish again."""

    @property
    def final(self) -> bool:
        return False


class NackingLosingSink(LosingSink):
    """Like LosingSink, but batch 1 came back with nacks to redo."""

    def send(self, messages: Sequence[TaskMessage]) -> Ticket:
        ticket = super().send(messages)
        if self.sends == 1:
            nacked = NackedTicket(ticket.size, 0)
            self.tickets[-1] = (nacked, self.tickets[-1][1])
            return nacked
        return ticket

    def wait(self, ticket: Ticket) -> list[Rejection]:
        self.waited_on_dead_connection = True  # it would publish the nacks over it again
        raise ConnectionResetError("connection lost")


def test_a_lost_send_leaves_a_batch_with_nacks_to_redo_in_flight() -> None:
    """Batch 1 is settled but holds nacked messages; batch 2's send fails: batch 1 is not
    redone over the dead connection nor committed, both stay in the source and the journal."""
    source = ListSource(entries(20))
    sink = NackingLosingSink(source, window=8, lose_at=2)
    report = Report()
    with pytest.raises(ConnectionResetError):
        Driver(source, sink, report, batch_size=8).move(LANE)
    assert report.migrated == {} and len(source.entries) == 20
    assert source.journal == [f"t{i}" for i in range(8)]
    assert not getattr(sink, "waited_on_dead_connection", False)


def test_a_task_adopted_at_several_losses_is_listed_once() -> None:
    report = Report(possible_duplicates=["t1", "t2", "t1", "t3", "t2"])
    assert report.as_dict()["possible_duplicates"] == ["t1", "t2", "t3"]
    assert len(report.possible_duplicates) == 5  # what Redis holds: trimmed by this count
