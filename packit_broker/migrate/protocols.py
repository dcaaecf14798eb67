"""The seams of the migration engine: what a source and a sink must offer the driver.

A source holds ordered *lanes* (a Redis list per queue and priority step, an AMQP queue) and
gives raw entries from the consuming end without removing them; it removes (commits) only what
the sink has accepted, and keeps an in-flight journal so a crash leaves every possibly
duplicated task id listed. A sink prepares a target, encodes task messages, sends a batch and
later says which of its messages it refused. The driver (packit_broker.migrate.driver) knows
nothing else about either side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from packit_broker.messages import TaskMessage
from packit_broker.queues import QueueSpec

Out = TypeVar("Out")


@dataclass(frozen=True)
class Lane:
    """One ordered stream of the source (`key`) and the queue it goes to (`target`)."""

    key: str
    target: QueueSpec


@dataclass(frozen=True)
class Rejection:
    """One message of a batch the sink did not take, and why (the destination's reason)."""

    index: int  # position in the batch passed to `send`
    reason: str


@dataclass
class Ticket:
    """A batch in flight: how many of its messages the sink has still to settle."""

    size: int
    outstanding: int
    refused: list[Rejection] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        return self.outstanding == 0

    @property
    def final(self) -> bool:
        """Settled with nothing left for the sink to redo: `wait` needs no connection."""
        return self.settled


class Source(Protocol):
    def read(self, lane: Lane, skip: int, count: int) -> Sequence[bytes]:
        """Up to `count` entries after the `skip` oldest, oldest first; nothing is removed."""
        ...

    def decode(self, raw: bytes, lane: Lane) -> TaskMessage:
        """One raw entry -> its task message; MalformedMessage if it is none (quarantined)."""
        ...

    def mark_inflight(self, where: str, task_ids: Sequence[str]) -> None:
        """Journal: these task ids are sent and not yet committed."""
        ...

    def commit(
        self,
        lane: Lane,
        entries: Sequence[bytes],
        quarantine: Sequence[int],
        *,
        keep_marker: bool,
    ) -> None:
        """Remove `entries` (still the oldest, checked), keeping those at `quarantine` aside;
        `keep_marker`: another batch is in flight, so the journal stays."""
        ...


class Sink(Protocol[Out]):
    def prepare(self, target: QueueSpec) -> None:
        """Make `target` exist as its consumers expect it."""
        ...

    def encode(self, message: TaskMessage, target: QueueSpec) -> Out:
        """The task message as this sink writes it; MalformedMessage if it cannot take it."""
        ...

    def send(self, messages: Sequence[Out]) -> Ticket:
        """Write without waiting for confirmation."""
        ...

    def wait(self, ticket: Ticket) -> list[Rejection]:
        """Block until every message of `ticket` is settled; the refused ones."""
        ...
