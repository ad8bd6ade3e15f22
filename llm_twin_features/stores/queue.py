"""RabbitMQ: the durable queue of warehouse change events and its dead-letter queue.

The topology is declared by the code (idempotently) on every connection:
- `<queue>`: a plain durable queue, no arguments: exactly what the original LLM Twin CDC
  declares, so either side may declare it first (a broker refuses a second declare of a
  queue with other arguments: 406 PRECONDITION_FAILED, channel closed). A queue that already
  exists with other arguments (the dead-letter arguments of older versions of this project)
  is used as it is, with a warning;
- `<queue>.dlx` (direct exchange) -> `<queue>.dead-letter` (durable queue).
Poison messages are republished to the dead-letter exchange by the consumer itself, with the
reason in the `x-poison-reason` header, confirmed, and only then acked: the work queue needs
no dead-letter arguments.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import pika
import pika.exceptions


class Message(Protocol):
    """What the publisher sends: a change event (`events/schema.py`) or anything like it."""

    event_id: str

    def to_json(self) -> bytes: ...


POISON_REASON_HEADER = "x-poison-reason"
POLL_INTERVAL = 0.05
log = logging.getLogger(__name__)
_reported: set[str] = set()  # topology warnings this process has logged already


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


class TopologyConflict(BrokerUnavailable):
    """The broker holds a queue or exchange of one of our names that cannot be used."""


def _conflict(config: BrokerConfig, what: str, error: Exception) -> TopologyConflict:
    code = getattr(error, "reply_code", None)
    text = getattr(error, "reply_text", None) or str(error)
    if code == 406:
        advice = (
            "it exists with other settings. Delete it once it is empty "
            "(`rabbitmqctl delete_queue` / `delete_exchange`, or the management UI) and it is "
            "declared again as expected, or set RABBITMQ_QUEUE to another name"
        )
    elif code == 405:
        advice = "another connection holds it as an exclusive queue"
    elif code == 403:
        advice = f"the RabbitMQ user may not configure it on vhost {config.vhost!r}"
    else:
        advice = "RabbitMQ refused it"
    return TopologyConflict(f"RabbitMQ at {config.address}: cannot use {what}: {advice} ({text})")


def declare_topology(connection: Any, config: BrokerConfig) -> tuple[Any, list[str]]:
    """Declares the dead-letter exchange and queue, and the work queue as a plain durable
    queue; returns an open channel and warnings. A failed declare closes its channel, so
    each attempt that may fail gets a new one."""
    channel = connection.channel()
    try:
        channel.exchange_declare(config.dead_letter_exchange, exchange_type="direct", durable=True)
    except pika.exceptions.ChannelClosedByBroker as error:
        raise _conflict(config, f"the exchange {config.dead_letter_exchange!r}", error) from error
    try:
        channel.queue_declare(config.dead_letter_queue, durable=True)
        channel.queue_bind(config.dead_letter_queue, config.dead_letter_exchange, config.queue)
    except pika.exceptions.ChannelClosedByBroker as error:
        raise _conflict(config, f"the queue {config.dead_letter_queue!r}", error) from error

    refused: pika.exceptions.ChannelClosedByBroker | None = None
    for _ in range(3):  # another client may create or delete the queue between two declares
        try:
            channel.queue_declare(config.queue, durable=True)
            return channel, []
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != 406:
                raise _conflict(config, f"the queue {config.queue!r}", error) from error
            refused = error
        # It exists, with other arguments or flags: use it as it is.
        channel = connection.channel()
        try:
            channel.queue_declare(config.queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as error:
            if error.reply_code != 404:
                raise _conflict(config, f"the queue {config.queue!r}", error) from error
            channel = connection.channel()  # deleted meanwhile: declare it again
            continue
        warning = (
            f"RabbitMQ queue {config.queue!r} exists with other arguments or flags than a plain "
            f"durable queue ({getattr(refused, 'reply_text', '')}), e.g. the dead-letter "
            "arguments of an older version of llm-twin-features: it is used as it is. A "
            "producer that declares it as a plain durable queue (the original LLM Twin CDC "
            "does) gets 406 PRECONDITION_FAILED: to fix that, stop the producers, let the "
            "sensor drain the queue, delete it (`rabbitmqctl delete_queue`) and it is declared "
            "again as a plain durable queue."
        )
        return channel, [warning]
    raise _conflict(config, f"the queue {config.queue!r}", refused or RuntimeError("unstable"))


class _Session:
    """One connection with a confirming channel and the topology declared."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.connection: pika.BlockingConnection | None = None
        self.channel: Any = None
        self.warnings: list[str] = []  # about the topology found on the broker

    def __enter__(self):
        self.connection = connect(self.config)
        try:
            with self._broker_errors("declaring the queues"):
                self.channel, self.warnings = declare_topology(self.connection, self.config)
                self.channel.confirm_delivery()
        except BrokerUnavailable:
            self.close()
            raise
        for warning in self.warnings:
            if warning not in _reported:  # once per process, not on every connection
                _reported.add(warning)
                log.warning(warning)
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

    def publish(self, events: Iterable[Message]) -> int:
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
    """Reads events without acking them; the caller acks what is safely covered.

    What it read and has not acked yet stays *held* on its connection: RabbitMQ gives those
    messages to no other consumer until they are acked, or until the connection closes, when
    they go back to the queue (redelivered). A consumer that keeps its inbox open from one read
    to the next (`kept_inbox`) finds them again in `held`."""

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__(config)
        self.held: dict[int, Delivery] = {}  # by delivery tag, in the order read

    def alive(self) -> bool:
        """Whether its connection is still open; answers the broker's heartbeats on the way
        (a connection closed by the broker, or dropped, shows here, not at the next read)."""
        if self.connection is None or not self.connection.is_open:
            return False
        try:
            self.connection.process_data_events(time_limit=0)
        except pika.exceptions.AMQPError:
            return False
        return self.connection.is_open

    def close(self) -> None:
        self.held.clear()  # back in the queue with the connection gone
        super().close()

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
                    assert self.connection is not None  # open: basic_get just answered
                    self.connection.sleep(POLL_INTERVAL)  # keeps the connection serviced
                    continue
                headers = properties.headers or {}
                delivery = Delivery(method.delivery_tag, body, method.redelivered, headers)
                deliveries.append(delivery)
                self.held[delivery.delivery_tag] = delivery
                quiet_until = time.monotonic() + settle
        return deliveries

    def ack(self, delivery_tags: Iterable[int]) -> None:
        with self._broker_errors("acking"):
            for tag in delivery_tags:
                self.channel.basic_ack(tag)
                self.held.pop(tag, None)

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


# Inboxes kept open between uses, by consumer name and broker, with when each was last used:
# see `kept_inbox`.
_kept: dict[tuple[str, BrokerConfig], tuple[EventInbox, float]] = {}
_kept_lock = threading.Lock()
# A kept inbox unused for this long is closed by the next use of another one: its consumer
# stopped (a sensor switched off), and the messages it held go back to the queue for the
# others, instead of waiting for the broker to drop its silent connection (minutes).
KEPT_IDLE_SECONDS = 30.0


@contextlib.contextmanager
def kept_inbox(consumer: str, config: BrokerConfig) -> Iterator[EventInbox]:
    """The inbox of `consumer` (a sensor), kept open from one use to the next in this process.

    Between two uses, the messages it read and has not acked stay held on its connection
    instead of going back to the queue, where another consumer (another sensor) would take
    them for new. Any failure inside closes it: its held messages go back to the queue, and the
    next use opens a new connection (a connection the broker dropped meanwhile too)."""
    key = (consumer, config)
    now = time.monotonic()
    with _kept_lock:
        inbox, _ = _kept.pop(key, (None, now))  # out of the registry while in use: one user
        idle = [k for k, (_, used) in _kept.items() if now - used > KEPT_IDLE_SECONDS]
        abandoned = [_kept.pop(k)[0] for k in idle]
    for other in abandoned:
        other.close()
    if inbox is not None and not inbox.alive():
        inbox.close()
        inbox = None
    if inbox is None:
        inbox = EventInbox(config).__enter__()
    try:
        yield inbox
    except BaseException:
        inbox.close()
        raise
    with _kept_lock:
        displaced = _kept.pop(key, None)  # opened by a concurrent use: one is enough
        _kept[key] = (inbox, time.monotonic())
    if displaced is not None:
        displaced[0].close()


def held_messages(config: BrokerConfig) -> int:
    """Messages of `config`'s queue that this process's kept inboxes hold (read, not acked)."""
    with _kept_lock:
        return sum(len(inbox.held) for (_, c), (inbox, _) in _kept.items() if c == config)


def close_kept_inboxes() -> None:
    """Closes every kept inbox of this process: their held messages go back to the queue."""
    with _kept_lock:
        inboxes = [inbox for inbox, _ in _kept.values()]
        _kept.clear()
    for inbox in inboxes:
        inbox.close()
