"""What a migration did, in any direction: written as JSON for the operator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from packit_broker.delayed_delivery import EtaSummary

#: Our Redis lists of task ids a report lists (evidence kept until a report said it).
POSSIBLE_DUPLICATES = "packit_broker.possible_duplicates"
#: Rollback: ids of messages RabbitMQ marked redelivered (see packit_broker.migrate.amqp_source)
REDELIVERED = "packit_broker.redelivered"


@dataclass
class QuarantinedEntry:
    source: str
    reason: str


@dataclass
class Report:
    migrated: dict[str, int] = field(default_factory=dict)
    unacked_migrated: int = 0
    quarantine: list[QuarantinedEntry] = field(default_factory=list)
    possible_duplicates: list[str] = field(default_factory=list)
    adopted_duplicates: int = 0  # how many of them were in Redis's list when the run began
    skipped: dict[str, str] = field(default_factory=dict)
    wrong_type: dict[str, str] = field(default_factory=dict)
    remaining: dict[str, int] = field(default_factory=dict)  # where -> entries left behind
    taken_over_from: str | None = None
    pending: dict[str, int] = field(default_factory=dict)  # --follow: left per queue, last round
    seconds: float = 0.0
    etas: EtaSummary = field(default_factory=EtaSummary)  # tasks moved before they were due

    @property
    def total(self) -> int:
        return sum(self.migrated.values())

    @property
    def complete(self) -> bool:
        return not self.remaining and not self.wrong_type

    def evidence(self) -> dict[str, list[str]]:
        """Each Redis list this report lists, with the ids as read (Redis forgets them only
        once the report is written)."""
        return {POSSIBLE_DUPLICATES: self.possible_duplicates}

    def as_dict(self) -> dict[str, Any]:
        return {
            "migrated": dict(self.migrated),
            "unacked_migrated": self.unacked_migrated,
            "quarantined": len(self.quarantine),
            "quarantine": [{"source": q.source, "reason": q.reason} for q in self.quarantine],
            # A task id adopted at several losses of the same batch is listed once.
            "possible_duplicates": list(dict.fromkeys(self.possible_duplicates)),
            "skipped": skipped_list(self.skipped),
            "wrong_type": wrong_type_list(self.wrong_type),
            "remaining": dict(self.remaining),
            "complete": self.complete,
            "taken_over_from": self.taken_over_from,
            "pending": dict(self.pending),
            "seconds": round(self.seconds, 3),
            "eta_tasks": self.etas.as_dict(),
        }


def skipped_list(skipped: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": name, "reason": why} for name, why in sorted(skipped.items())]


def wrong_type_list(wrong: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "type": kind} for key, kind in sorted(wrong.items())]
