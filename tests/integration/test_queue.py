"""The RabbitMQ adapter against the real broker on 127.0.0.1:5672."""

import dataclasses

import pytest

from llm_twin_features.events.schema import ChangeEvent
from llm_twin_features.stores.queue import (
    POISON_REASON_HEADER,
    BrokerUnavailable,
    EventInbox,
    EventPublisher,
    TopologyConflict,
)


def events(n: int) -> list[ChangeEvent]:
    return [ChangeEvent(type="posts", entry_id=f"p{i}", op="update") for i in range(n)]


def test_published_events_are_durable_and_unacked_ones_come_back(broker):
    sent = events(5)
    with EventPublisher(broker) as publisher:
        assert publisher.publish(sent) == 5
    with EventInbox(broker) as inbox:
        first = inbox.drain(max_events=3, time_budget=5)
        assert [d.body for d in first] == [e.to_json() for e in sent[:3]]
        assert not any(d.redelivered for d in first)
        inbox.ack([first[0].delivery_tag])
    # The connection closed with two messages unacked: they are redelivered.
    with EventInbox(broker) as inbox:
        again = inbox.drain(max_events=10, time_budget=5)
        assert sorted(d.body for d in again) == sorted(e.to_json() for e in sent[1:])
        assert sum(d.redelivered for d in again) == 2
        inbox.ack(d.delivery_tag for d in again)
        assert inbox.depth() == 0


def test_drain_stops_at_the_bound(broker):
    with EventPublisher(broker) as publisher:
        publisher.publish(events(20))
    with EventInbox(broker) as inbox:
        assert len(inbox.drain(max_events=7, time_budget=5)) == 7


def test_poison_goes_to_the_dead_letter_queue_with_its_reason(broker):
    with EventPublisher(broker) as publisher:
        publisher._publish("", broker.queue, b"not json")
    with EventInbox(broker) as inbox:
        (poison,) = inbox.drain(10, 5)
        inbox.dead_letter(poison, "invalid JSON: Expecting value")
        assert inbox.depth() == 0
    dead = EventInbox(dataclasses.replace(broker))
    with dead:
        _, properties, body = dead.channel.basic_get(broker.dead_letter_queue, auto_ack=True)
    assert body == b"not json"
    assert properties.headers[POISON_REASON_HEADER] == "invalid JSON: Expecting value"


def test_unreachable_broker_is_a_clear_error(broker):
    unreachable = dataclasses.replace(broker, port=1)
    expected = r"RabbitMQ at amqp://127.0.0.1:1 unreachable"
    with pytest.raises(BrokerUnavailable, match=expected), EventPublisher(unreachable):
        pass


def test_password_is_not_in_the_config_repr(broker):
    secret = dataclasses.replace(broker, user="twin", password="s3cret-value")
    assert "s3cret-value" not in repr(secret)


def plain_declare(broker, **arguments):
    """Declares the queue the way the original LLM Twin CDC does (or with `arguments`)."""
    import pika

    connection = pika.BlockingConnection(pika.ConnectionParameters(broker.host, broker.port))
    try:
        connection.channel().queue_declare(
            queue=broker.queue, durable=True, arguments=arguments or None
        )
    finally:
        connection.close()


def test_our_queue_is_a_plain_durable_queue_another_producer_may_declare(broker):
    with EventPublisher(broker) as publisher:
        publisher.publish(events(1))
        assert publisher.warnings == []
    plain_declare(broker)  # no 406 PRECONDITION_FAILED: the same declaration
    with EventInbox(broker) as inbox:
        assert inbox.depth() == 1


def test_queue_declared_plain_by_another_producer_first_is_used(broker):
    plain_declare(broker)
    with EventPublisher(broker) as publisher:
        publisher.publish(events(2))
    with EventInbox(broker) as inbox:
        assert inbox.warnings == []
        (first, second) = inbox.drain(10, 5)
        inbox.dead_letter(first, "poison")  # dead-lettering needs no queue arguments
        inbox.ack([second.delivery_tag])
        assert inbox.depth() == 0
        dead = inbox.channel.queue_declare(broker.dead_letter_queue, passive=True)
        assert dead.method.message_count == 1


def test_queue_declared_by_an_older_version_is_used_as_it_is(broker):
    """Older versions declared the queue with dead-letter arguments: kept, with a warning
    that says what a plain-declaring producer would meet and how to switch."""
    plain_declare(
        broker,
        **{
            "x-dead-letter-exchange": broker.dead_letter_exchange,
            "x-dead-letter-routing-key": broker.queue,
        },
    )
    with EventPublisher(broker) as publisher:
        publisher.publish(events(3))
        (warning,) = publisher.warnings
    assert "used as it is" in warning and "406 PRECONDITION_FAILED" in warning
    assert "x-dead-letter-exchange" in warning
    with EventInbox(broker) as inbox:
        deliveries = inbox.drain(10, 5)
        assert len(deliveries) == 3
        inbox.dead_letter(deliveries[0], "poison")
        inbox.ack(d.delivery_tag for d in deliveries[1:])
        assert inbox.depth() == 0


def test_unreconcilable_topology_is_a_clear_error(broker):
    import pika

    connection = pika.BlockingConnection(pika.ConnectionParameters(broker.host, broker.port))
    connection.channel().exchange_declare(broker.dead_letter_exchange, exchange_type="fanout")
    connection.close()
    expected = rf"cannot use the exchange '{broker.dead_letter_exchange}': it exists with other"
    with pytest.raises(TopologyConflict, match=expected), EventInbox(broker):
        pass
