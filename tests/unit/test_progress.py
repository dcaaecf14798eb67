"""Issue 18: progress where people look - the formatter and the throttling, on a fake clock."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from packit_broker.commands.migrate import _finish, _print_summary, _Progress
from packit_broker.migrate.progress import (
    PLAIN_INTERVAL,
    RATE_WINDOW,
    SHOWN_IDS,
    Meter,
    Throttle,
    counts,
    duration,
    shortened,
    summary,
    timestamp,
)
from packit_broker.migrate.report import POSSIBLE_DUPLICATES, Report


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_one_shot_line_has_counts_share_rate_and_eta() -> None:
    clock = FakeClock()
    meter = Meter(400_000, clock)
    clock.advance(5)
    meter.add(120_000)
    assert counts(meter) == "120000/400000 moved (30.0%), 24000 msg/s, ETA 12s"


def test_follow_line_has_no_share_or_eta() -> None:
    clock = FakeClock()
    meter = Meter(None, clock)
    clock.advance(4)
    meter.add(10)
    assert counts(meter) == "10 moved, 2.5 msg/s"
    assert counts(meter, pending=7) == "10 moved, 2.5 msg/s, 7 pending"


def test_rate_is_recent_so_an_old_pause_does_not_dilute_it() -> None:
    clock = FakeClock()
    meter = Meter(None, clock)
    clock.advance(100)  # idle for long
    for _ in range(2 * int(RATE_WINDOW)):
        clock.advance(1)
        meter.add(50)
    assert meter.rate() == pytest.approx(50)
    clock.advance(RATE_WINDOW + 1)  # stalled: the rate drops to 0, no ETA
    assert meter.rate() == 0
    assert Meter(10, clock).eta() is None


def test_durations_read_short() -> None:
    assert [duration(s) for s in (0.25, 9.5, 12.4, 185, 7440)] == [
        "0.2s",
        "9.5s",
        "12s",
        "3m05s",
        "2h04m",
    ]


def test_throttle_allows_one_line_per_interval_first_after_one_interval() -> None:
    clock = FakeClock()
    throttle = Throttle(PLAIN_INTERVAL, clock)
    seen = []
    for _ in range(int(4 * PLAIN_INTERVAL / 0.5)):
        clock.advance(0.5)
        if throttle.due():
            seen.append(clock.now - 1000.0)
    assert seen == [PLAIN_INTERVAL * k for k in (1, 2, 3, 4)]
    assert throttle.remaining() == PLAIN_INTERVAL
    clock.advance(PLAIN_INTERVAL + 3)
    assert throttle.remaining() == 0


def test_plain_output_is_one_line_per_interval_and_one_at_the_end(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock()
    progress = _Progress(1000, False, clock=clock, tty=False)
    for _ in range(100):  # a batch of 10 every 0.1 s: 10 s in all
        clock.advance(0.1)
        progress("q", 10)
    progress.notify("resumed")
    progress.finish()
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("migrate: 500/1000 moved (50.0%), 100 msg/s, ETA 5.0s")
    assert lines[1].startswith("migrate: 1000/1000 moved (100.0%)")
    assert lines[2] == "resumed"
    assert lines[3].startswith("migrate: 1000/1000 moved (100.0%)")
    assert "\r" not in captured.err and "\x1b" not in captured.err


def test_plain_follow_stays_quiet_while_nothing_changes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock()
    progress = _Progress(0, False, follow=True, clock=clock, tty=False)
    clock.advance(1)
    progress("q", 3)
    progress.show_pending({"q": 2})
    for _ in range(10):
        clock.advance(PLAIN_INTERVAL)
        progress._maybe_plain()  # what the ticker does
    assert capsys.readouterr().err.splitlines() == ["migrate: 3 moved, 0.5 msg/s, 2 pending"]


def test_tty_bar_is_redrawn_in_place_with_counts(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    progress = _Progress(100, False, clock=clock, tty=True)
    clock.advance(1)
    progress("q", 50)
    clock.advance(1)
    progress("q", 50)
    progress.finish()
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1
    last = err.rsplit("\r", 1)[1]
    assert last.startswith("[" + "#" * 24 + "] 100/100 moved (100.0%), 50 msg/s, ETA 0.0s")


def test_json_progress_keeps_its_keys_and_adds_ts_and_rate(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = FakeClock()
    progress = _Progress(40, True, clock=clock, tty=True)
    clock.advance(2)
    progress("q", 20)
    event = json.loads(capsys.readouterr().out)
    assert {k: event[k] for k in ("event", "queue", "moved", "total")} == {
        "event": "progress",
        "queue": "q",
        "moved": 20,
        "total": 40,
    }
    assert event["rate"] == 10.0
    when = dt.datetime.fromisoformat(event["ts"])
    assert when.utcoffset() == dt.timedelta(0)
    assert abs((dt.datetime.now(dt.UTC) - when).total_seconds()) < 60


def test_timestamp_is_utc_iso8601() -> None:
    moment = dt.datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert timestamp(moment) == "2024-05-01T12:00:00.123Z"


def test_summary_has_totals_rate_duration_and_report() -> None:
    line = summary(
        "migrate",
        state="done",
        moved=400_000,
        seconds=16,
        report_path="/tmp/r.json",
        quarantined=2,
        possible_duplicates=1000,
    )
    assert line == (
        "migrate: done, 400000 moved in 16s (25000 msg/s), 2 quarantined,"
        " 1000 possible duplicates; report: /tmp/r.json"
    )
    bare = summary("rollback", state="stopped", moved=0, seconds=0, report_path=None)
    assert bare == "rollback: stopped, 0 moved in 0.0s (0.0 msg/s); no report file (--report FILE)"


def test_long_id_lists_are_shortened_to_where_the_rest_is() -> None:
    ids = [f"id-{i}" for i in range(1000)]
    text, whole = shortened(ids, "/tmp/r.json", kept="(rerun)")
    assert not whole
    assert text.startswith("id-0, id-1, ") and f"id-{SHOWN_IDS - 1}, ..." in text
    assert f"id-{SHOWN_IDS}," not in text
    assert text.endswith(f"... {1000 - SHOWN_IDS} more in /tmp/r.json")
    assert shortened(ids, None, kept="(rerun)")[0].endswith("more (rerun)")
    assert shortened(ids[:SHOWN_IDS], None, kept="(rerun)") == (", ".join(ids[:SHOWN_IDS]), True)


def _report(duplicates: list[str]) -> dict[str, object]:
    return {
        "migrated": {"q": 5},
        "unacked_migrated": 0,
        "quarantined": 0,
        "quarantine": [],
        "possible_duplicates": duplicates,
        "skipped": [],
        "wrong_type": [],
        "remaining": {},
        "taken_over_from": None,
    }


def test_summary_shows_a_count_and_ten_ids_of_a_long_list(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = [f"task-{i:04d}" for i in range(1000)]
    assert _print_summary(_report(ids), None) == {"possible_duplicates"}
    out = capsys.readouterr().out
    assert "possible duplicates (in flight at a crash or a lost connection): 1000: " in out
    assert "task-0009, ... 990 more (kept in Redis: rerun with --report FILE" in out
    assert "task-0010" not in out
    assert _print_summary(_report(ids), "r.json") == {"possible_duplicates"}
    assert "990 more in r.json" in capsys.readouterr().out
    assert _print_summary(_report(ids[:3]), None) == set()
    assert "3: task-0000, task-0001, task-0002\n" in capsys.readouterr().out


def test_ids_shown_only_in_part_are_not_forgotten_without_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    many = Report(migrated={"q": 1}, possible_duplicates=[f"t{i}" for i in range(SHOWN_IDS + 1)])
    assert _finish(many, None, False, name="migrate", stopped=False) == set()
    few = Report(migrated={"q": 1}, possible_duplicates=["t1"])
    assert _finish(few, None, False, name="migrate", stopped=False) == {POSSIBLE_DUPLICATES}
    told = {POSSIBLE_DUPLICATES}
    assert _finish(many, tmp_path / "r.json", False, name="migrate", stopped=False) == told
    assert _finish(many, None, True, name="migrate", stopped=False) == told  # all on stdout
    out = capsys.readouterr().out
    assert out.count("migrate: done, 1 moved in 0.0s") == 3
    assert f"report: {tmp_path / 'r.json'}" in out
