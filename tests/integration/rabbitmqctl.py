"""Operator actions on the rig's real RabbitMQ node: alarms, policies, runtime limits."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

from packit_broker.stack import Stack
from packit_broker.stack.rabbitmq import RABBITMQ_SBIN

DEFAULT_WATERMARK = "0.4"  # RabbitMQ 3.10's vm_memory_high_watermark


def rabbitmqctl(stack: Stack, *args: str) -> str:
    """Run rabbitmqctl against the stack's node (its own HOME, cookie, epmd port, node name)."""
    env = {**os.environ, **stack.processes["rabbitmq"].env}
    done = subprocess.run(
        [f"{RABBITMQ_SBIN[0]}/rabbitmqctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@contextlib.contextmanager
def memory_alarm(stack: Stack) -> Iterator[None]:
    """A real memory alarm: the watermark far below what the node uses; restored afterwards."""
    rabbitmqctl(stack, "set_vm_memory_high_watermark", "0.0000001")
    try:
        yield
    finally:
        rabbitmqctl(stack, "set_vm_memory_high_watermark", DEFAULT_WATERMARK)


@contextlib.contextmanager
def max_message_size(stack: Stack, limit: int) -> Iterator[None]:
    """rabbitmq.conf's max_message_size, set at runtime.

    RabbitMQ 3.x channels read it from the application environment when they open; 4.x reads
    it from a persistent_term (rabbit_channel:check_msg_size/2): both are set, both restored.
    """
    old = rabbitmqctl(stack, "eval", "persistent_term:get(max_message_size, undefined).").strip()
    rabbitmqctl(
        stack,
        "eval",
        f"application:set_env(rabbit, max_message_size, {limit}),"
        f" persistent_term:put(max_message_size, {limit}).",
    )
    try:
        yield
    finally:
        restore = (
            "persistent_term:erase(max_message_size)"
            if old == "undefined"
            else f"persistent_term:put(max_message_size, {int(old)})"
        )
        rabbitmqctl(stack, "eval", f"application:unset_env(rabbit, max_message_size), {restore}.")


@contextlib.contextmanager
def policy(stack: Stack, name: str, pattern: str, definition: str) -> Iterator[None]:
    rabbitmqctl(stack, "set_policy", name, pattern, definition, "--apply-to", "queues")
    try:
        yield
    finally:
        rabbitmqctl(stack, "clear_policy", name)
