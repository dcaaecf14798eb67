"""The command's own safety nets: the report path and the exit code."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from packit_broker.commands.migrate import (
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_QUARANTINED,
    _check_report_path,
    _exit_code,
    _layout,
    _Progress,
    _write_atomically,
)
from packit_broker.migrate.report import QuarantinedEntry, Report


def test_report_path_is_checked_before_the_run(tmp_path: Path) -> None:
    _check_report_path(tmp_path / "report.json")
    with pytest.raises(click.UsageError, match="does not exist"):
        _check_report_path(tmp_path / "missing" / "report.json")
    with pytest.raises(click.UsageError, match="is a directory"):
        _check_report_path(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_report_is_replaced_whole(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    _write_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_exit_code_says_what_is_left() -> None:
    assert _exit_code(Report()) == EXIT_OK
    assert _exit_code(Report(quarantine=[QuarantinedEntry("q", "bad")])) == EXIT_QUARANTINED
    assert _exit_code(Report(remaining={"q": 1})) == EXIT_INCOMPLETE
    assert _exit_code(Report(wrong_type={"q": "hash"})) == EXIT_INCOMPLETE


def test_key_prefix_folds_into_the_transport_options() -> None:
    assert _layout(None, "app1:").global_keyprefix == "app1:"
    assert _layout('{"global_keyprefix": "app1:"}', "app1:").global_keyprefix == "app1:"
    with pytest.raises(click.UsageError, match="disagree"):
        _layout('{"global_keyprefix": "a:"}', "b:")


def test_follow_shows_moved_and_pending_per_queue_on_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    progress = _Progress(0, False, follow=True)
    progress.follow_line = True  # as on a TTY
    progress("short", 5)
    progress.show_pending({"short": 2, "long": 0})
    progress.show_pending({"short": 2, "long": 0})  # unchanged: not redrawn
    progress.notify("PAUSED: a client is consuming from Redis")
    err = capsys.readouterr().err
    assert err.count("\r") == 2
    assert err.rsplit("\r", 1)[1].startswith("long: 0 moved, 0 pending  short: 5 moved, 2 pending")
    assert err.endswith("\nPAUSED: a client is consuming from Redis\n")


def test_missing_from_and_to_name_their_environment_variables() -> None:
    from click.testing import CliRunner

    from packit_broker.commands.migrate import migrate

    unset = {"PACKIT_MIGRATE_FROM": None, "PACKIT_MIGRATE_TO": None, "PACKIT_BROKER_URL": None}
    no_from = CliRunner().invoke(migrate, [], env=unset)
    assert no_from.exit_code == 2
    assert "Missing option '--from' (env var: 'PACKIT_MIGRATE_FROM')" in no_from.output
    no_to = CliRunner().invoke(migrate, ["--from", "redis://127.0.0.1:1/0"], env=unset)
    assert no_to.exit_code == 2
    assert "Missing option '--to' (env var: 'PACKIT_MIGRATE_TO'" in no_to.output
    assert "PACKIT_BROKER_URL" in no_to.output
    shown = " ".join(CliRunner().invoke(migrate, ["--help"], env=unset).output.split())
    assert "[env var: PACKIT_MIGRATE_FROM; required]" in shown
    assert "[env var: PACKIT_MIGRATE_TO]" in shown


def test_metrics_bind_the_address_given() -> None:
    import urllib.request

    from packit_broker.commands.migrate import _serve_metrics
    from packit_broker.stack.processes import free_port

    port = free_port()
    _serve_metrics(("127.0.0.1", port))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
    with open("/proc/net/tcp") as table:  # local address, state 0A = LISTEN
        rows = [line.split() for line in table.read().splitlines()[1:]]
    bound = [
        r[1].split(":")[0] for r in rows if int(r[1].split(":")[1], 16) == port and r[3] == "0A"
    ]
    assert bound == ["0100007F"], bound  # 127.0.0.1, not 00000000 (every interface)


def test_a_metrics_address_of_another_host_is_a_usage_error() -> None:
    import click
    import pytest

    from packit_broker.commands.migrate import _serve_metrics
    from packit_broker.stack.processes import free_port

    with pytest.raises(click.UsageError, match=r"--metrics-address 192\.0\.2\.1"):
        _serve_metrics(("192.0.2.1", free_port()))
