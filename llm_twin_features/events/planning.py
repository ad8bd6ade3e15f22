"""How a sensor tick turns queued change events into runs without losing any (no Dagster here).

A message is acked only once a run that covers it exists:
1. the tick reads messages without acking them;
2. new events are grouped per data type into a batch whose run key is a digest of its event
   ids; the batch goes into the sensor cursor as *pending* and its run is requested;
3. the tick ends with those messages unacked, held by the sensor's connection, which stays
   open (`stores.queue.kept_inbox`): no other consumer gets them meanwhile;
4. a later tick finds the pending batch's run in the instance, marks its events *covered*
   and acks their messages (held, or redelivered if the connection was lost meanwhile). A
   pending batch whose run does not exist yet (the daemon died before creating it) is
   requested again under the same run key.
A crash anywhere leaves messages unacked, hence redelivered once their connection is gone:
at-least-once, and the runs are idempotent. A message without an event id (the original LLM
Twin CDC's) gets one derived from its body (`schema.derived_event_id`), so its redelivery is
recognised in step 4 too; two messages with the same body are one event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from llm_twin_features.events.schema import ChangeEvent, PoisonMessage, parse_event
from llm_twin_features.stores.queue import Delivery

COVERED_CAP = 2000  # event ids remembered after their run exists


@dataclass
class Batch:
    run_key: str
    data_type: str
    event_ids: list[str]
    entry_ids: list[str]
    oldest_event: str

    @classmethod
    def of(cls, data_type: str, events: list[ChangeEvent]) -> Batch:
        event_ids = sorted({e.event_id for e in events})
        digest = hashlib.sha256(",".join(event_ids).encode()).hexdigest()[:24]
        return cls(
            run_key=f"events-{data_type}-{digest}",
            data_type=data_type,
            event_ids=event_ids,
            entry_ids=sorted({e.entry_id for e in events}),
            oldest_event=min(e.timestamp for e in events).isoformat(),
        )


@dataclass
class SensorCursor:
    pending: dict[str, Batch] = field(default_factory=dict)
    covered: list[str] = field(default_factory=list)

    @classmethod
    def loads(cls, raw: str | None) -> SensorCursor:
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(
            pending={k: Batch(**v) for k, v in data.get("pending", {}).items()},
            covered=list(data.get("covered", [])),
        )

    def dumps(self) -> str:
        return json.dumps(
            {"pending": {k: asdict(v) for k, v in self.pending.items()}, "covered": self.covered}
        )


@dataclass
class TickPlan:
    ack: list[int]
    dead_letter: list[tuple[Delivery, str]]
    requests: list[Batch]
    cursor: SensorCursor
    new_events: int = 0


def plan_tick(
    deliveries: list[Delivery], cursor: SensorCursor, run_exists: Callable[[str], bool]
) -> TickPlan:
    pending = dict(cursor.pending)
    covered = list(cursor.covered)
    for run_key, batch in list(pending.items()):
        if run_exists(run_key):
            covered.extend(batch.event_ids)
            del pending[run_key]
    covered_set = set(covered)
    pending_events = {e for batch in pending.values() for e in batch.event_ids}

    ack: list[int] = []
    dead_letter: list[tuple[Delivery, str]] = []
    new: dict[str, dict[str, ChangeEvent]] = {}
    tags_of: dict[str, list[int]] = {}  # a new event's messages (two with one body: one event)
    for delivery in deliveries:
        try:
            event = parse_event(delivery.body)
        except PoisonMessage as poison:
            dead_letter.append((delivery, str(poison)))
            continue
        if event.event_id in covered_set:
            ack.append(delivery.delivery_tag)
        elif event.event_id not in pending_events:
            new.setdefault(event.type, {})[event.event_id] = event
            tags_of.setdefault(event.event_id, []).append(delivery.delivery_tag)

    new_events = 0
    for data_type, events in new.items():
        batch = Batch.of(data_type, list(events.values()))
        if run_exists(batch.run_key):
            # Another sensor's run covers exactly these events: their messages came back to
            # the queue when its connection closed (e.g. its process restarted).
            covered.extend(batch.event_ids)
            ack.extend(tag for event_id in batch.event_ids for tag in tags_of[event_id])
            continue
        pending[batch.run_key] = batch
        new_events += len(events)
    return TickPlan(
        ack=ack,
        dead_letter=dead_letter,
        requests=list(pending.values()),
        cursor=SensorCursor(pending=pending, covered=covered[-COVERED_CAP:]),
        new_events=new_events,
    )
