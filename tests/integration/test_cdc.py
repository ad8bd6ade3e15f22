"""The CDC watcher: change translation, publishing with confirms to the real RabbitMQ, and the
durable resume token.

No MongoDB server can run here, so the change stream itself is a MOCK: `ScriptedChangeStream`
replays a fixed list of change documents through the same `watch(...)`/`try_next()`/
`resume_token` interface pymongo provides. Everything around it is real (montydb holds the
resume token, RabbitMQ receives the events). `test_contract_with_a_real_replica_set` runs the
same code against a real replica set when `TEST_MONGO_URI` is set.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from datetime import UTC, datetime

import pytest
from pymongo.errors import AutoReconnect

from llm_twin_features import cli
from llm_twin_features.events import cdc
from llm_twin_features.stores.queue import EventInbox
from llm_twin_features.stores.warehouse import Warehouse, open_warehouse


def change(n: int, op: str = "update", coll: str = "posts", doc: str | None = None) -> dict:
    return {
        "_id": {"_data": f"82{n:020d}"},
        "operationType": op,
        "ns": {"db": "twin", "coll": coll},
        "documentKey": {"_id": doc or f"doc-{n}"},
        "wallTime": datetime(2026, 11, 21, 12, 0, n, tzinfo=UTC),
    }


class ScriptedChangeStream:
    """MOCK of a pymongo change stream (no MongoDB server here)."""

    def __init__(self, changes: list[dict], stop: threading.Event, fail_after: int | None):
        self.changes, self.stop, self.fail_after = changes, stop, fail_after
        self.position, self.resume_token = 0, None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def try_next(self):
        if self.fail_after is not None and self.position == self.fail_after:
            raise AutoReconnect("scripted network failure")
        if self.position == len(self.changes):
            self.stop.set()
            return None
        item = self.changes[self.position]
        self.position += 1
        self.resume_token = item["_id"]
        return item


class ScriptedClient:
    """The warehouse client with its `twin` database's change stream scripted; every other
    database (the features database holding the resume token) is the real montydb one."""

    def __init__(self, real, changes, stop, fail_after=None):
        self.real, self.changes, self.stop, self.fail_after = real, changes, stop, fail_after
        self.resumed_after: list = []

    class admin:
        @staticmethod
        def command(name: str) -> dict:
            assert name == "hello"
            return {"setName": "scripted-rs", "isWritablePrimary": True}

    def __getitem__(self, name):
        if name != "twin":
            return self.real[name]
        client = self

        class Database:
            def watch(self, pipeline, resume_after=None, max_await_time_ms=None):
                assert pipeline == cdc.change_pipeline()
                client.resumed_after.append(resume_after)
                start = 0
                if resume_after is not None:
                    start = [c["_id"] for c in client.changes].index(resume_after) + 1
                fail = client.fail_after - start if client.fail_after is not None else None
                client.fail_after = None  # the failure happens once
                return ScriptedChangeStream(client.changes[start:], client.stop, fail)

        return Database()


@pytest.fixture
def montydb(tmp_path):
    store = open_warehouse(None, "twin", "twin_features", tmp_path)
    yield store
    store.close()


def scripted(montydb, changes, fail_after=None) -> tuple[Warehouse, threading.Event]:
    stop = threading.Event()
    client = ScriptedClient(montydb.client, changes, stop, fail_after)
    return Warehouse(client, "twin", "twin_features", embedded=False), stop


def drain(broker) -> list[dict]:
    with EventInbox(broker) as inbox:
        deliveries = inbox.drain(1000, 5)
        inbox.ack(d.delivery_tag for d in deliveries)
    return [json.loads(d.body) for d in deliveries]


def test_translate_covers_every_operation_and_ignores_the_rest():
    for op in ("insert", "update", "replace", "delete"):
        event = cdc.translate(change(1, op, "articles", "a1"))
        assert (event.type, event.entry_id, event.op) == ("articles", "a1", op)
    assert cdc.translate(change(1, "drop")) is None
    assert cdc.translate(change(1, "insert", "users")) is None
    # The event id comes from the resume token: a republished change keeps its id.
    assert cdc.translate(change(5)).event_id == cdc.translate(change(5)).event_id
    assert cdc.translate(change(5)).event_id != cdc.translate(change(6)).event_id


def test_changes_are_published_and_the_token_saved(montydb, broker):
    changes = [
        change(1, "insert"),
        change(2, "update"),
        change(3, "delete", "repositories"),
        change(4, "insert", "users"),
    ]
    warehouse, stop = scripted(montydb, changes)
    tokens = cdc.ResumeTokenStore(warehouse)
    assert cdc.watch_once(warehouse, broker, tokens, stop) == 3
    events = drain(broker)
    assert [(e["type"], e["entry_id"], e["op"]) for e in events] == [
        ("posts", "doc-1", "insert"),
        ("posts", "doc-2", "update"),
        ("repositories", "doc-3", "delete"),
    ]
    assert tokens.load() == changes[-1]["_id"]  # ignored changes move the token too


def test_restart_resumes_from_the_durable_token_and_loses_nothing(montydb, broker):
    changes = [change(n) for n in range(1, 7)]
    warehouse, stop = scripted(montydb, changes, fail_after=3)
    tokens = cdc.ResumeTokenStore(warehouse)
    with pytest.raises(AutoReconnect):
        cdc.watch_once(warehouse, broker, tokens, stop)
    assert tokens.load() == changes[2]["_id"]

    # A new process: a fresh token store over the same database resumes after change 3.
    restarted, stop = scripted(montydb, changes)
    assert cdc.watch_once(restarted, broker, cdc.ResumeTokenStore(restarted), stop) == 3
    assert restarted.client.resumed_after == [changes[2]["_id"]]
    assert [e["entry_id"] for e in drain(broker)] == [f"doc-{n}" for n in range(1, 7)]


def test_run_reconnects_with_backoff(montydb, broker):
    changes = [change(n) for n in range(1, 4)]
    warehouse, stop = scripted(montydb, changes, fail_after=1)
    started = time.monotonic()
    cdc.run(warehouse, broker, stop)
    assert time.monotonic() - started >= 1.0  # waited before reconnecting
    assert [e["entry_id"] for e in drain(broker)] == ["doc-1", "doc-2", "doc-3"]
    assert warehouse.client.resumed_after == [None, changes[0]["_id"]]


def test_embedded_warehouse_is_refused_with_a_clear_message(data_dir, capsys):
    assert cli.main(["cdc"]) == 2
    assert "montydb warehouse has no change streams; set MONGO_URI" in capsys.readouterr().err


@pytest.mark.skipif(
    not os.environ.get("TEST_MONGO_URI"), reason="needs TEST_MONGO_URI (a replica set)"
)
def test_contract_with_a_real_replica_set(broker, tmp_path):
    database = f"twin_cdc_{uuid.uuid4().hex[:8]}"
    warehouse = open_warehouse(os.environ["TEST_MONGO_URI"], database, database + "_f", tmp_path)
    cdc.require_replica_set(warehouse)
    stop = threading.Event()
    worker = threading.Thread(target=cdc.run, args=(warehouse, broker, stop), daemon=True)
    worker.start()
    time.sleep(2)
    posts = warehouse.client[database]["posts"]
    posts.insert_one({"_id": "p1", "content": {"text": "a"}})
    posts.update_one({"_id": "p1"}, {"$set": {"content.text": "b"}})
    posts.replace_one({"_id": "p1"}, {"content": {"text": "c"}})
    posts.delete_one({"_id": "p1"})
    deadline, events = time.monotonic() + 30, []
    while len(events) < 4 and time.monotonic() < deadline:
        events += drain(broker)
        time.sleep(0.5)
    stop.set()
    worker.join(10)
    warehouse.client.drop_database(database)
    warehouse.client.drop_database(database + "_f")
    assert [e["op"] for e in events] == ["insert", "update", "replace", "delete"]
