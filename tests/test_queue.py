"""The RabbitMQ adapter against the real broker on 127.0.0.1:5672."""

import dataclasses

import pytest

from llm_twin_features.events import ChangeEvent
from llm_twin_features.stores.queue import (
    POISON_REASON_HEADER,
    BrokerUnavailable,
    EventInbox,
    EventPublisher,
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
