"""RabbitMQ: the durable queue of warehouse change events and its dead-letter queue.

The topology is declared by the code (idempotently) on every connection:
- `<queue>`: durable; messages rejected by a consumer go to the dead-letter exchange;
- `<queue>.dlx` (direct exchange) -> `<queue>.dead-letter` (durable queue).
Poison messages are republished to the dead-letter exchange with the reason in the
`x-poison-reason` header, confirmed, and only then acked.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions

from llm_twin_features.events import ChangeEvent

POISON_REASON_HEADER = "x-poison-reason"
POLL_INTERVAL = 0.05


class BrokerUnavailable(RuntimeError):
    """RabbitMQ could not be reached or refused the operation."""


@dataclass(frozen=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 5672
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    vhost: str = "/"
    queue: str = "warehouse_changes"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.queue}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dead-letter"

    @property
    def address(self) -> str:
        return f"amqp://{self.host}:{self.port}{self.vhost if self.vhost != '/' else ''}"

    def parameters(self) -> pika.ConnectionParameters:
        extra: dict[str, Any] = {}
        if self.user:
            extra["credentials"] = pika.PlainCredentials(self.user, self.password or "")
        return pika.ConnectionParameters(
            host=self.host,
            port=self.port,
            virtual_host=self.vhost,
            connection_attempts=1,
            socket_timeout=5,
            stack_timeout=10,
            blocked_connection_timeout=10,
            heartbeat=60,
            **extra,
        )


def connect(config: BrokerConfig) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(config.parameters())
    except pika.exceptions.AMQPError as error:
        reason = str(error) or type(error).__name__
        raise BrokerUnavailable(f"RabbitMQ at {config.address} unreachable: {reason}") from error


def declare_topology(channel: Any, config: BrokerConfig) -> None:
    channel.exchange_declare(config.dead_letter_exchange, exchange_type="direct", durable=True)
    channel.queue_declare(config.dead_letter_queue, durable=True)
    channel.queue_bind(config.dead_letter_queue, config.dead_letter_exchange, config.queue)
    channel.queue_declare(
        config.queue,
        durable=True,
        arguments={
            "x-dead-letter-exchange": config.dead_letter_exchange,
            "x-dead-letter-routing-key": config.queue,
        },
    )


class _Session:
    """One connection with a confirming channel and the topology declared."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.connection: pika.BlockingConnection | None = None
        self.channel: Any = None

    def __enter__(self):
        self.connection = connect(self.config)
        try:
            with self._broker_errors("declaring the queues"):
                self.channel = self.connection.channel()
                self.channel.confirm_delivery()
                declare_topology(self.channel, self.config)
        except BrokerUnavailable:
            self.close()
            raise
        return self

    @contextlib.contextmanager
    def _broker_errors(self, doing: str) -> Iterator[None]:
        """Any broker failure (a dropped connection included) as one clear error."""
        try:
            yield
        except pika.exceptions.AMQPError as error:
            raise BrokerUnavailable(
                f"RabbitMQ at {self.config.address}: {doing} failed: {error!r}"
            ) from error

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Closing returns every unacked message to the queue (redelivered)."""
        if self.connection is not None and self.connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self.connection.close()
        self.connection = None

    def _publish(self, exchange: str, routing_key: str, body: bytes, **properties: Any) -> None:
        with self._broker_errors("publishing"):
            self.channel.basic_publish(
                exchange=exchange,
                routing_key=routing_key,
                body=body,
                properties=pika.BasicProperties(
                    delivery_mode=pika.DeliveryMode.Persistent,
                    content_type="application/json",
                    **properties,
                ),
                mandatory=True,
            )


class EventPublisher(_Session):
    """Publishes persistent events with publisher confirms: return means the broker has it."""

    def publish(self, events: Iterable[ChangeEvent]) -> int:
        count = 0
        for event in events:
            self._publish("", self.config.queue, event.to_json(), message_id=event.event_id)
            count += 1
        return count


@dataclass
class Delivery:
    delivery_tag: int
    body: bytes
    redelivered: bool
    headers: dict[str, Any]


class EventInbox(_Session):
    """Reads events without acking them; the caller acks what is safely covered."""

    def drain(
        self, max_events: int, time_budget: float, wait: float = 0.0, settle: float = 0.0
    ) -> list[Delivery]:
        """Up to `max_events` messages within `time_budget` seconds. An empty queue is waited
        on for up to `wait` seconds (a long poll); once messages flow, reading goes on until
        none has come for `settle` seconds, so a burst lands in one batch."""
        deliveries: list[Delivery] = []
        started = time.monotonic()
        deadline = started + time_budget
        quiet_until = started + min(wait, time_budget)
        with self._broker_errors("reading events"):
            while len(deliveries) < max_events and time.monotonic() < deadline:
                method, properties, body = self.channel.basic_get(self.config.queue, auto_ack=False)
                if method is None:
                    if time.monotonic() >= quiet_until:
                        break
                    self.connection.sleep(POLL_INTERVAL)  # keeps the connection serviced
                    continue
                headers = properties.headers or {}
                deliveries.append(Delivery(method.delivery_tag, body, method.redelivered, headers))
                quiet_until = time.monotonic() + settle
        return deliveries

    def ack(self, delivery_tags: Iterable[int]) -> None:
        with self._broker_errors("acking"):
            for tag in delivery_tags:
                self.channel.basic_ack(tag)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Moves a poison message to the dead-letter queue with its reason, then acks it."""
        headers = {**delivery.headers, POISON_REASON_HEADER: reason[:1000]}
        self._publish(
            self.config.dead_letter_exchange, self.config.queue, delivery.body, headers=headers
        )
        self.ack([delivery.delivery_tag])

    def depth(self) -> int:
        with self._broker_errors("reading the queue depth"):
            declared = self.channel.queue_declare(self.config.queue, passive=True)
        return declared.method.message_count
