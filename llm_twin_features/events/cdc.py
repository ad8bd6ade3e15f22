"""`llm-twin-features cdc`: MongoDB change streams -> RabbitMQ change events.

Unlike the original (inserts only, no resume token), this watches insert, update, replace and
delete on the three collections, publishes each change with publisher confirms, and only then
stores the stream's resume token in the features database; after a restart it resumes from
that token, so a change is published at least once. The event id is derived from the change's
resume token, so a change republished after a crash carries the same id.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from llm_twin_features.domain.data_types import data_types, is_data_type
from llm_twin_features.events.schema import ChangeEvent
from llm_twin_features.stores.queue import BrokerConfig, BrokerUnavailable, EventPublisher
from llm_twin_features.stores.warehouse import Warehouse

log = logging.getLogger(__name__)

OPERATIONS = ("insert", "update", "replace", "delete")


def change_pipeline() -> list[dict[str, Any]]:
    """The change-stream filter: the operations and collections the pipeline handles."""
    return [
        {
            "$match": {
                "operationType": {"$in": list(OPERATIONS)},
                "ns.coll": {"$in": list(data_types())},
            }
        }
    ]


STATE_ID = "cdc_resume_token"


class NotAReplicaSet(RuntimeError):
    """Change streams need a MongoDB replica set (or sharded cluster)."""


def translate(change: dict[str, Any]) -> ChangeEvent | None:
    """The event for one change-stream document; None for changes the pipeline ignores."""
    operation = change.get("operationType")
    collection = (change.get("ns") or {}).get("coll")
    if operation not in OPERATIONS or not is_data_type(collection):
        return None
    token = change["_id"]
    token_data = token.get("_data") if isinstance(token, dict) else str(token)
    wall_time = change.get("wallTime") or change.get("clusterTime")
    timestamp = wall_time if isinstance(wall_time, datetime) else datetime.now(UTC)
    return ChangeEvent(
        event_id=hashlib.sha256(str(token_data).encode()).hexdigest()[:32],
        type=collection,
        entry_id=str(change["documentKey"]["_id"]),
        op=operation,
        timestamp=timestamp,
    )


class ResumeTokenStore:
    """The last published change's resume token, in the features database."""

    def __init__(self, warehouse: Warehouse) -> None:
        self._state = warehouse.client[warehouse.features_database]["cdc_state"]

    def load(self) -> dict | None:
        document = self._state.find_one({"_id": STATE_ID})
        return document["token"] if document else None

    def save(self, token: dict) -> None:
        self._state.replace_one(
            {"_id": STATE_ID},
            {"_id": STATE_ID, "token": token, "saved_at": datetime.now(UTC)},
            upsert=True,
        )


def require_replica_set(warehouse: Warehouse) -> None:
    if warehouse.embedded:
        raise NotAReplicaSet(
            "the embedded montydb warehouse has no change streams; set MONGO_URI to a MongoDB "
            "replica set (docker compose starts one), or publish events with `ingest`/`delete`"
        )
    hello = warehouse.client.admin.command("hello")
    if not hello.get("setName") and hello.get("msg") != "isdbgrid":
        raise NotAReplicaSet(
            "MongoDB at MONGO_URI is a standalone server; change streams need a replica set "
            "(start mongod with --replSet and run rs.initiate())"
        )


def watch_once(
    warehouse: Warehouse,
    broker: BrokerConfig,
    tokens: ResumeTokenStore,
    stop: threading.Event,
    on_event: Callable[[ChangeEvent], Any] = lambda _: None,
) -> int:
    """Streams changes until `stop` is set or a store fails; returns how many were published."""
    published = 0
    database = warehouse.client[warehouse.database]
    with (
        EventPublisher(broker) as publisher,
        database.watch(
            change_pipeline(), resume_after=tokens.load(), max_await_time_ms=500
        ) as stream,
    ):
        while not stop.is_set():
            change = stream.try_next()
            if change is None:
                continue
            event = translate(change)
            if event is not None:
                publisher.publish([event])  # confirmed by the broker before the token moves
                published += 1
                on_event(event)
            tokens.save(stream.resume_token)
    return published


def run(
    warehouse: Warehouse,
    broker: BrokerConfig,
    stop: threading.Event,
    on_event: Callable[[ChangeEvent], Any] = lambda _: None,
    max_backoff: float = 30.0,
) -> None:
    """Watches forever, reconnecting with exponential backoff after a store failure."""
    from pymongo.errors import PyMongoError

    require_replica_set(warehouse)
    tokens = ResumeTokenStore(warehouse)
    delay = 1.0
    while not stop.is_set():
        started = time.monotonic()
        try:
            watch_once(warehouse, broker, tokens, stop, on_event)
        except (PyMongoError, BrokerUnavailable) as error:
            if time.monotonic() - started > 60:  # it had been healthy: start over
                delay = 1.0
            log.warning("change stream interrupted (%s); reconnecting in %.0f s", error, delay)
            stop.wait(delay)
            delay = min(delay * 2, max_backoff)
