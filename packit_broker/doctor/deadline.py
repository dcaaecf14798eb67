"""A wall-clock deadline per endpoint, so that `check` ends even when a server trickles.

Every socket operation has `--timeout`, but a server that sends one byte a second, or endless
garbage that looks like the start of a huge frame, never lets a single read time out. Each
endpoint's layers therefore run in a thread of their own with a deadline of
`DEADLINE_FACTOR` x `--timeout`; endpoints run side by side, so `check` as a whole ends within
that too. Whatever layer was under way at the deadline is reported as failed, after the layers
that had already passed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from packit_broker.doctor.results import CheckResult

#: How many --timeout periods one endpoint may take in all; below 3 so that a whole `check`
#: (process start included) ends within 3 x --timeout against any server.
DEADLINE_FACTOR = 2.6

#: The layer that follows each one, to name where an endpoint was when its deadline passed.
_NEXT_LAYER = {"": "dns", "dns": "tcp", "tcp": "tls"}

Check = Callable[[list[CheckResult]], object]


def _hung(
    name: str, endpoint: str, protocol: str, done: list[CheckResult], budget: float
) -> CheckResult:
    last = done[-1].layer if done else ""
    layer = _NEXT_LAYER.get(last, protocol)
    after = f" after the {last} layer passed" if last else ""
    return CheckResult(
        name,
        endpoint,
        layer,
        "FAIL",
        f"no complete answer within {budget:g} s{after}: the server sends nothing, a"
        " trickle, or bytes that are not " + ("AMQP" if protocol == "amqp" else "PostgreSQL"),
        "check that the Route's targetPort (or *_CONNECT_TO) is the server's TLS port and that"
        " the server is not overloaded; a merely slow server passes with a larger --timeout",
    )


def _guarded(name: str, endpoint: str, check: Check, results: list[CheckResult]) -> None:
    """`check`, whose unexpected exception is a failed line rather than a half report."""
    try:
        check(results)
    except Exception as exc:  # a bug or an error no layer translated: still a failure
        results.append(
            CheckResult(
                name,
                endpoint,
                "internal",
                "FAIL",
                f"{type(exc).__name__}: {exc}",
                "a bug in packit-broker check: report it with this line",
            )
        )


def run_within(
    checks: Sequence[tuple[str, str, str, Check]], timeout: float
) -> list[list[CheckResult]]:
    """Run each (name, endpoint, protocol, check) side by side, each until the deadline.

    `check` appends its results to the list it is given as it goes; a check still running at
    the deadline is left behind (a daemon thread: the process does not wait for it) and what
    it had found, plus one failure for the layer under way, is returned."""
    budget = DEADLINE_FACTOR * timeout
    started = time.monotonic()
    running = []
    for name, endpoint, protocol, check in checks:
        results: list[CheckResult] = []
        thread = threading.Thread(
            target=_guarded, args=(name, endpoint, check, results), name=f"check {name}",
            daemon=True,
        )  # fmt: skip
        thread.start()
        running.append((name, endpoint, protocol, thread, results))
    outcome = []
    for name, endpoint, protocol, thread, results in running:
        thread.join(max(0.0, started + budget - time.monotonic()))
        snapshot = list(results)
        if thread.is_alive():
            snapshot.append(_hung(name, endpoint, protocol, snapshot, budget))
        outcome.append(snapshot)
    return outcome
