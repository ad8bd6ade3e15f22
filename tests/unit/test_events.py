"""Event parsing and the tick planner that decides what to request and what to ack."""

import json

import pytest

from llm_twin_features.events.planning import Batch, SensorCursor, plan_tick
from llm_twin_features.events.schema import ChangeEvent, PoisonMessage, parse_event
from llm_twin_features.stores.queue import Delivery


def delivery(tag: int, body: bytes | dict) -> Delivery:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Delivery(delivery_tag=tag, body=data, redelivered=False, headers={})


def event(event_id: str, data_type: str = "posts", entry_id: str = "d1", op: str = "update"):
    return ChangeEvent(event_id=event_id, type=data_type, entry_id=entry_id, op=op)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"type": "users", "entry_id": "x", "op": "insert"}', "unknown type 'users'"),
        (b'{"type": "posts", "op": "insert"}', "missing entry_id"),
        (b'{"type": "posts", "entry_id": "x", "op": "upsert"}', "op: Input should be"),
        (b"\xff\xfe", "invalid JSON"),
    ],
)
def test_poison_messages_are_named_with_a_reason(body: bytes, reason: str):
    with pytest.raises(PoisonMessage, match=reason):
        parse_event(body)


def test_event_round_trips_through_json():
    original = event("e1", "articles", "a1", "delete")
    assert parse_event(original.to_json()) == original


def test_new_events_become_one_pending_batch_per_type():
    deliveries = [
        delivery(1, event("e1", "posts", "p1").model_dump(mode="json")),
        delivery(2, event("e2", "posts", "p2").model_dump(mode="json")),
        delivery(3, event("e3", "articles", "a1", "delete").model_dump(mode="json")),
        delivery(4, event("e1", "posts", "p1").model_dump(mode="json")),  # a duplicate publish
    ]
    plan = plan_tick(deliveries, SensorCursor(), run_exists=lambda _: False)
    assert plan.ack == [] and plan.dead_letter == []  # nothing acked before its run exists
    batches = {b.data_type: b for b in plan.requests}
    assert batches["posts"].entry_ids == ["p1", "p2"]
    assert batches["posts"].event_ids == ["e1", "e2"]
    assert batches["articles"].entry_ids == ["a1"]
    assert set(plan.cursor.pending) == {b.run_key for b in plan.requests}
    assert plan.new_events == 3


def test_run_key_depends_only_on_the_events():
    a = Batch.of("posts", [event("e1"), event("e2")])
    b = Batch.of("posts", [event("e2"), event("e1")])
    assert a.run_key == b.run_key != Batch.of("posts", [event("e1")]).run_key


def test_redelivered_events_are_acked_once_their_run_exists():
    deliveries = [delivery(1, event("e1").model_dump(mode="json"))]
    first = plan_tick(deliveries, SensorCursor(), run_exists=lambda _: False)
    (run_key,) = first.cursor.pending

    # Same messages again (redelivered), but the daemon has not created the run yet:
    # the same run is requested again, nothing is acked.
    again = plan_tick(deliveries, first.cursor, run_exists=lambda _: False)
    assert [b.run_key for b in again.requests] == [run_key] and again.ack == []

    # The run exists now: its events are covered and the redelivered message is acked.
    redelivered = [delivery(7, event("e1").model_dump(mode="json"))]
    done = plan_tick(redelivered, again.cursor, run_exists=lambda key: key == run_key)
    assert done.ack == [7] and done.requests == [] and done.cursor.pending == {}
    assert "e1" in done.cursor.covered


def test_events_another_sensors_run_covers_are_acked_not_requested_again():
    """A sensor's held messages went back to the queue (its connection closed) and another
    sensor reads them: the run of exactly these events exists, so they are acked."""
    deliveries = [
        delivery(3, event("e1").model_dump(mode="json")),
        delivery(4, event("e1").model_dump(mode="json")),  # the same event published twice
        delivery(5, event("e2", "articles", "a1").model_dump(mode="json")),
    ]
    theirs = Batch.of("posts", [event("e1")]).run_key
    plan = plan_tick(deliveries, SensorCursor(), run_exists=lambda key: key == theirs)
    assert sorted(plan.ack) == [3, 4] and plan.new_events == 1
    assert [b.data_type for b in plan.requests] == ["articles"]
    assert "e1" in plan.cursor.covered and theirs not in plan.cursor.pending


def test_interrupted_tick_loses_nothing():
    """A tick whose result is lost (crash before run submission) leaves messages unacked;
    the next tick, from the last saved cursor, requests the same run."""
    deliveries = [delivery(1, event("e1").model_dump(mode="json"))]
    lost = plan_tick(deliveries, SensorCursor(), run_exists=lambda _: False)
    retried = plan_tick(deliveries, SensorCursor(), run_exists=lambda _: False)
    assert [b.run_key for b in retried.requests] == [b.run_key for b in lost.requests]


def test_poison_is_dead_lettered_and_valid_events_go_on():
    deliveries = [delivery(1, b"garbage"), delivery(2, event("e1").model_dump(mode="json"))]
    plan = plan_tick(deliveries, SensorCursor(), run_exists=lambda _: False)
    assert [(d.delivery_tag, reason[:12]) for d, reason in plan.dead_letter] == [
        (1, "invalid JSON")
    ]
    assert len(plan.requests) == 1


def test_cursor_round_trips_and_stays_bounded():
    cursor = SensorCursor(
        pending={"k": Batch("k", "posts", ["e1"], ["d1"], "2026-01-01T00:00:00+00:00")},
        covered=[f"e{i}" for i in range(10)],
    )
    assert SensorCursor.loads(cursor.dumps()) == cursor
    big = SensorCursor(covered=[f"e{i}" for i in range(5000)])
    plan = plan_tick([], big, run_exists=lambda _: True)
    assert len(plan.cursor.covered) == 2000 and plan.cursor.covered[-1] == "e4999"


# --- the original LLM Twin CDC's messages: no `op`, no event id ------------------------------

ORIGINAL_POST = {  # a crawled post minus `_id`, plus `type` and `entry_id`, as that CDC sends it
    "platform": "linkedin",
    "content": {"text": "Change data capture, the course way.", "image": None},
    "author_id": "a1",
    "type": "posts",
    "entry_id": "p1",
}


def test_original_cdc_message_is_an_event_with_an_id_derived_from_its_body():
    body = json.dumps(ORIGINAL_POST).encode()
    event = parse_event(body)
    assert (event.type, event.entry_id, event.op) == ("posts", "p1", None)
    # Every delivery of the same message gives the same id (key order, spacing do not count).
    reordered = json.dumps(dict(reversed(list(ORIGINAL_POST.items()))), indent=2).encode()
    assert parse_event(body).event_id == parse_event(reordered).event_id == event.event_id
    # Another document state is another event.
    edited = {**ORIGINAL_POST, "content": {"text": "Edited."}}
    assert parse_event(json.dumps(edited).encode()).event_id != event.event_id
    # A document's own fields are not event fields: a crawled `timestamp` is no poison.
    crawled = parse_event(json.dumps({**ORIGINAL_POST, "timestamp": "last week"}).encode())
    assert crawled.entry_id == "p1"


def test_our_event_without_an_event_id_gets_a_stable_one():
    body = json.dumps(
        {"type": "posts", "entry_id": "p1", "op": "update", "timestamp": "2026-11-21T10:00:00Z"}
    ).encode()
    assert parse_event(body).event_id == parse_event(body).event_id
    assert parse_event(body).op == "update"


@pytest.mark.parametrize(
    "body",
    [
        ORIGINAL_POST,
        {"type": "posts", "entry_id": "p1", "op": "update", "timestamp": "2026-11-21T10:00:00Z"},
    ],
    ids=["original-cdc", "no-event-id"],
)
def test_message_without_event_id_is_acked_once_its_run_exists_and_never_reruns(body):
    """Issue 9, point 6: such a message used to get a new random id on every read, so it was
    never acked and each tick requested a new run."""
    first = plan_tick([delivery(1, body)], SensorCursor(), run_exists=lambda _: False)
    (run_key,) = first.cursor.pending
    assert first.new_events == 1

    # Redelivered before the run exists: the same run again, nothing new.
    again = plan_tick([delivery(2, body)], first.cursor, run_exists=lambda _: False)
    assert [b.run_key for b in again.requests] == [run_key]
    assert again.new_events == 0 and again.ack == []

    # Redelivered once the run exists: acked, no run requested.
    done = plan_tick([delivery(3, body)], again.cursor, run_exists=lambda key: key == run_key)
    assert done.ack == [3] and done.requests == [] and done.new_events == 0
    assert done.dead_letter == []
