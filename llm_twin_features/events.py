"""Warehouse change events: one JSON message per changed document.

    {"event_id": "…", "type": "posts", "entry_id": "…", "op": "update",
     "timestamp": "2026-11-21T10:00:00+00:00"}

Processing is order-insensitive: an event only says "look at this document again"; the run
reads the document's current state, so a late insert after a delete cannot resurrect it.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from llm_twin_features.settings import DATA_TYPES

Operation = Literal["insert", "update", "replace", "delete"]


class PoisonMessage(ValueError):
    """A message that can never be processed; it is dead-lettered with this reason."""


class ChangeEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1)
    type: str
    entry_id: str = Field(min_length=1)
    op: Operation
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
    if data.get("type") not in DATA_TYPES:
        raise PoisonMessage(f"unknown type {data.get('type')!r}; expected one of {DATA_TYPES}")
    if not data.get("entry_id"):
        raise PoisonMessage("missing entry_id")
    try:
        return ChangeEvent.model_validate(data)
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise PoisonMessage(f"invalid event: {details}") from error
