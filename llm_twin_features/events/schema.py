"""Warehouse change events: one JSON message per changed document.

    {"event_id": "…", "type": "posts", "entry_id": "…", "op": "update",
     "timestamp": "2026-11-21T10:00:00+00:00"}

Processing is order-insensitive: an event only says "look at this document again"; the run
reads the document's current state, so a late insert after a delete cannot resurrect it.

The original LLM Twin CDC publishes a different body to the same kind of queue: the inserted
document minus `_id`, plus `type` and `entry_id`, with no `op` and no event id. Such a
message is accepted too: no `op` means "look at this document again" (`op` is None), and a
missing event id is derived from the message itself (a uuid5 of its canonical JSON), so a
redelivered message keeps its id: it is recognised, acked once its run exists, and never
starts a new run.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from llm_twin_features.domain.data_types import data_types, is_data_type

Operation = Literal["insert", "update", "replace", "delete"]
# Namespace of the event ids derived from messages that carry none (uuid5).
_DERIVED_ID_NAMESPACE = uuid.UUID("0b7f5a52-33d4-4f0e-9c55-6a4c9d3f1e27")
EVENT_KEYS = ("event_id", "type", "entry_id")  # what a message without `op` is read for


class PoisonMessage(ValueError):
    """A message that can never be processed; it is dead-lettered with this reason."""


class ChangeEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1)
    type: str
    entry_id: str = Field(min_length=1)
    op: Operation | None = None  # None: a message without `op` (the original CDC's)
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def parse_event(body: bytes) -> ChangeEvent:
    """The event in a message body; raises PoisonMessage with a reason when there is none."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PoisonMessage(f"invalid JSON: {error}") from error
    if not isinstance(data, dict):
        raise PoisonMessage("message is not a JSON object")
    if not is_data_type(data.get("type")):
        raise PoisonMessage(f"unknown type {data.get('type')!r}; expected one of {data_types()}")
    if not data.get("entry_id"):
        raise PoisonMessage("missing entry_id")
    # Without `op`, the message is the original CDC's: a whole document, whose own fields are
    # not event fields (a crawled `timestamp` is not the event's time).
    keys = (*EVENT_KEYS, "op", "timestamp") if "op" in data else EVENT_KEYS
    fields = {k: data[k] for k in keys if k in data}
    if data.get("event_id") in (None, ""):
        fields["event_id"] = derived_event_id(data)
    try:
        return ChangeEvent.model_validate(fields)
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise PoisonMessage(f"invalid event: {details}") from error


def derived_event_id(data: dict) -> str:
    """The id of a message that carries none: the same for every delivery of the same body
    (key order and whitespace do not matter)."""
    canonical = json.dumps(
        data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
    return uuid.uuid5(_DERIVED_ID_NAMESPACE, canonical).hex
