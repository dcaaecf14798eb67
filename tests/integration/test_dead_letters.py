"""Quorum queues keep a task that passed its delivery limit, and `check` flags one that would not.

RabbitMQ 4.0+ drops a quorum queue's message after 20 deliveries unless the queue has a
dead-letter target; a requeue, a worker crash or a cut connection counts as a delivery.
"""

from __future__ import annotations

import time
import uuid

import amqp
import pytest

from packit_broker.queues import DELIVERY_LIMIT, QueueSpec, QueueType
from packit_broker.stack import Stack
from tests.integration.test_check import first_failure, run_check

pytestmark = pytest.mark.integration


def _get(channel: amqp.Channel, queue: str, seconds: float = 3.0) -> amqp.Message | None:
    """basic.get, waiting a little: a quorum queue commits a requeue or dead letter through
    its Raft log, so the message may not be there the instant after."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = channel.basic_get(queue)
        if message is not None:
            return message
        time.sleep(0.05)
    return None


def test_task_requeued_past_the_delivery_limit_ends_in_the_dead_letter_queue(
    stack: Stack,
) -> None:
    spec = QueueSpec(f"dl-{uuid.uuid4().hex[:8]}", QueueType.QUORUM)
    assert spec.dead_letter_queue is not None
    body = b'{"poison": "\\u00e9"}\x00\xff'  # kept byte-exact
    headers = {"id": "poison-1", "task": "usersapp.record"}
    with stack.amqp_connection() as conn:
        channel = conn.channel()
        spec.declare(channel)
        channel.confirm_select()
        channel.basic_publish_confirm(
            amqp.Message(body, application_headers=headers, delivery_mode=2),
            exchange=spec.exchange,
            routing_key=spec.routing_key,
        )
        deliveries = 0
        while (message := _get(channel, spec.name)) is not None:
            deliveries += 1
            channel.basic_reject(message.delivery_tag, requeue=True)  # a worker that gives up
            assert deliveries <= DELIVERY_LIMIT + 5, "the delivery limit is not in effect"
        # Dead-lettered on the return that passes the limit (3.x and 4.x count the same way).
        assert DELIVERY_LIMIT <= deliveries <= DELIVERY_LIMIT + 1, deliveries
        assert channel.queue_declare(spec.name, passive=True).message_count == 0
        dead = _get(channel, spec.dead_letter_queue)
        assert dead is not None, "the task went nowhere"
        assert dead.body == body
        death = dead.properties["application_headers"]["x-death"][0]
        assert death["queue"] == spec.name and death["reason"] == "delivery_limit"
        assert dead.properties["application_headers"]["id"] == "poison-1"
        channel.queue_delete(spec.name)
        channel.queue_delete(spec.dead_letter_queue)


def test_check_flags_a_quorum_queue_without_a_dead_letter_target(stack: Stack) -> None:
    name = f"bare-{uuid.uuid4().hex[:8]}"
    with stack.amqp_connection() as conn:
        conn.channel().queue_declare(
            name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )
    env = {**stack.broker_env(), "PACKIT_BROKER_QUEUES": name, "PACKIT_BROKER_QUEUE_TYPE": "quorum"}
    try:
        code, results, _ = run_check(env)
        assert code == 1
        failure = first_failure(results)
        assert failure["layer"] == "queue-arguments", failure
        assert "has no dead-letter target" in failure["seen"]
        assert f"rabbitmqctl delete_queue {name}" in failure["fix"]
    finally:
        with stack.amqp_connection() as conn:
            conn.channel().queue_delete(name)
