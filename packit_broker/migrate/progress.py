"""Progress people can read where they look: a terminal, a pipe, a pod log, a script.

Pure arithmetic and formatting with an injected clock; `packit_broker.commands.migrate`
decides where the lines go.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Callable, Sequence

#: Seconds between two progress lines when stderr is not a terminal (a pipe, a pod log).
PLAIN_INTERVAL = 5.0
#: Seconds between two redraws of the live line on a terminal.
TTY_INTERVAL = 0.2
#: Seconds of recent history the rate is measured over (a follow run idles, then moves).
RATE_WINDOW = 10.0
#: Ids shown on the terminal from a long list; the report file has them all.
SHOWN_IDS = 10
#: Width of the terminal bar, in characters.
BAR_WIDTH = 24

Clock = Callable[[], float]


class Meter:
    """Counts what moved against a clock, so every renderer says the same rate and ETA."""

    def __init__(self, total: int | None, clock: Clock = time.monotonic) -> None:
        self.total = total  # None: unknown or growing (--follow)
        self.clock = clock
        self.started = clock()
        self.moved = 0
        # (when, moved so far): the newest sample older than the window anchors the rate.
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(self.started, 0)])

    def add(self, count: int) -> None:
        self.moved += count
        now = self.clock()
        self._samples.append((now, self.moved))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while len(self._samples) > 1 and self._samples[1][0] <= now - RATE_WINDOW:
            self._samples.popleft()

    def elapsed(self) -> float:
        return max(self.clock() - self.started, 0.0)

    def rate(self) -> float:
        """Messages per second over the last RATE_WINDOW seconds (0 when nothing moved)."""
        now = self.clock()
        self._trim(now)
        when, moved = self._samples[0]
        # Nothing moved between the anchor and the window's start: measure from whichever
        # is later, so a pause long ago does not dilute the rate now.
        span = now - max(when, now - RATE_WINDOW)
        return (self.moved - moved) / span if span > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the current rate; None without a known total or a rate."""
        rate = self.rate()
        if self.total is None or rate <= 0:
            return None
        return max(self.total - self.moved, 0) / rate


class Throttle:
    """At most one line per `interval`, the first one `interval` after the start (a short
    run prints only its end)."""

    def __init__(self, interval: float, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last = clock()

    def due(self) -> bool:
        """True (and the next line counted from now) once `interval` has passed."""
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            return True
        return False

    def remaining(self) -> float:
        """Seconds until the next line is due (0 if it is)."""
        return max(self.last + self.interval - self.clock(), 0.0)


def duration(seconds: float) -> str:
    """12s, 3m05s, 2h04m: short enough for one log line."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def rate_text(rate: float) -> str:
    return f"{rate:.1f} msg/s" if rate < 10 else f"{rate:.0f} msg/s"


def counts(meter: Meter, pending: int | None = None) -> str:
    """`120000/400000 moved (30.0%), 23500 msg/s, ETA 12s`; without a total (--follow) the
    moved count and rate, and what is pending if known."""
    rate = meter.rate()
    if meter.total is None:
        text = f"{meter.moved} moved, {rate_text(rate)}"
        return text if pending is None else f"{text}, {pending} pending"
    share = 100.0 * meter.moved / meter.total if meter.total else 100.0
    text = f"{meter.moved}/{meter.total} moved ({min(share, 100.0):.1f}%), {rate_text(rate)}"
    eta = meter.eta()
    return text if eta is None else f"{text}, ETA {duration(eta)}"


def bar(meter: Meter) -> str:
    """`[#########---------------]`, or a spinner-free empty bar without a total."""
    if not meter.total:
        filled = BAR_WIDTH if meter.total == 0 else 0
    else:
        filled = min(BAR_WIDTH, BAR_WIDTH * meter.moved // meter.total)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + "]"


def timestamp(now: dt.datetime | None = None) -> str:
    """ISO-8601 in UTC with milliseconds, as `2024-05-01T12:00:00.123Z`."""
    moment = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def summary(
    name: str,
    *,
    state: str,
    moved: int,
    seconds: float,
    report_path: str | None,
    quarantined: int = 0,
    possible_duplicates: int = 0,
) -> str:
    """The one line a run ends with: totals, rate, duration, where the report is."""
    rate = moved / seconds if seconds > 0 else 0.0
    parts = [f"{name}: {state}, {moved} moved in {duration(seconds)} ({rate_text(rate)})"]
    if quarantined:
        parts.append(f"{quarantined} quarantined")
    if possible_duplicates:
        parts.append(f"{possible_duplicates} possible duplicates")
    parts.append(f"report: {report_path}" if report_path else "no report file (--report FILE)")
    return ", ".join(parts[:-1]) + "; " + parts[-1]


def shortened(items: Sequence[str], report_path: str | None, *, kept: str) -> tuple[str, bool]:
    """At most SHOWN_IDS of `items` for the terminal, and whether that was all of them; the
    rest is named by where it is: the report file, or (`kept`) how to get it."""
    shown = ", ".join(items[:SHOWN_IDS])
    rest = len(items) - SHOWN_IDS
    if rest <= 0:
        return shown, True
    where = f"in {report_path}" if report_path else kept
    return f"{shown}, ... {rest} more {where}", False
