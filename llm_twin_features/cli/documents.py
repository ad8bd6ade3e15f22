"""`ingest` and `delete`: the warehouse's documents, and the change events of each write."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from llm_twin_features.cli.common import err, warehouse_of
from llm_twin_features.domain.data_types import data_types, is_data_type
from llm_twin_features.settings import Settings

if TYPE_CHECKING:  # imported where used, at run time
    from llm_twin_features.events.schema import ChangeEvent, Operation

MAX_NESTING = 100  # levels of objects/arrays in one document; deeper lines are rejected
_BOM = b"\xef\xbb\xbf"
_ID_NAMESPACE = uuid.UUID("5b0c6bd4-6a43-4a8e-9f3e-0f6d1c2b7a10")  # ids of documents without one


def read_documents(paths: Iterable[str]) -> Iterator[tuple[str, dict | None, str | None]]:
    """(file:line, document, error) per non-blank line of JSONL files.

    Each line stands alone: a line that is not UTF-8, not JSON, nested too deeply or not a
    warehouse document gets its own error, and the lines around it are still read. A UTF-8
    byte-order mark at the start of a file is ignored.
    """
    for path in paths:
        try:
            with open(path, "rb") as lines:
                for number, raw in enumerate(lines, start=1):
                    if number == 1 and raw.startswith(_BOM):
                        raw = raw[len(_BOM) :]
                    if not raw.strip():
                        continue
                    document, error = parse_document_line(raw)
                    yield f"{path}:{number}", document, error
        except OSError as error:
            yield path, None, f"cannot read the file: {error.strerror or error}"


def parse_document_line(raw: bytes) -> tuple[dict | None, str | None]:
    """One JSONL line as a warehouse document with `type` and a string `_id`, or the reason
    it cannot be one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8: {error}"
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON: {error.msg} (column {error.colno})"
    except RecursionError:
        return None, f"nested deeper than {MAX_NESTING} levels"
    if not isinstance(document, dict):
        return None, "a line must be a JSON object"
    if _nesting(document) > MAX_NESTING:
        return None, f"nested deeper than {MAX_NESTING} levels"
    data_type = document.pop("type", None)
    if not is_data_type(data_type):
        return None, f"unknown type {data_type!r}; expected one of {', '.join(data_types())}"
    operators = sorted(k for k in document if k.startswith("$"))
    if operators:
        return None, f"field names may not start with '$' (MongoDB): {', '.join(operators)}"
    try:
        document["_id"] = document_id(data_type, document)
    except ValueError as error:
        return None, str(error)
    return {"type": data_type, **document}, None


def document_id(data_type: str, document: dict) -> str:
    """The warehouse id of an ingested document, the same on every ingest of the same line.

    A non-empty string is kept; Extended JSON `{"$oid": "<24 hex digits>"}` becomes its hex
    string; a missing or null `_id` becomes a uuid5 of the type and the canonical JSON of
    the document (so re-ingesting a file replaces instead of duplicating); anything else is
    refused, because turning `0`, `true` or `""` into a string would change the id silently.
    """
    given = document.get("_id")
    if given is None:
        body = {k: v for k, v in document.items() if k != "_id"}
        canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return str(uuid.uuid5(_ID_NAMESPACE, f"{data_type}\n{canonical}"))
    if isinstance(given, str) and given:
        return given
    if isinstance(given, dict) and set(given) == {"$oid"}:
        oid = given["$oid"]
        if (
            isinstance(oid, str)
            and len(oid) == 24
            and all(c in "0123456789abcdefABCDEF" for c in oid)
        ):
            return oid.lower()
        raise ValueError(f"invalid _id: $oid must be 24 hexadecimal digits, got {oid!r}")
    raise ValueError(
        f"invalid _id {json.dumps(given)[:60]}: an id must be a non-empty string or "
        '{"$oid": "<24 hex digits>"}; leave it out to get one derived from the content'
    )


def _nesting(value: object) -> int:
    """Depth of nested objects and arrays, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def cmd_ingest(args: argparse.Namespace, settings: Settings) -> int:
    batches: dict[str, list[dict]] = {t: [] for t in data_types()}
    bad = 0
    for location, document, error in read_documents(args.files):
        if error:
            bad += 1
            err(f"{location}: {error}")
            continue
        assert document is not None
        data_type = document.pop("type")
        batches[data_type].append(document)
    events = []
    with warehouse_of(settings) as warehouse:
        for data_type, documents in batches.items():
            collection = warehouse.documents(data_type)
            existing = collection.ids() if documents else set()
            collection.replace_many(documents)
            events += [
                change_event(data_type, d["_id"], "replace" if d["_id"] in existing else "insert")
                for d in documents
            ]
    counts = ", ".join(f"{t}: {len(d)}" for t, d in batches.items())
    print(f"ingested {len(events)} documents ({counts}); {bad} bad lines skipped")
    published = publish(events, settings, args.no_publish, replay="llm-twin-features backfill")
    return 1 if bad or not published else 0


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    with warehouse_of(settings) as warehouse:
        collection = warehouse.documents(args.type)
        present = {str(d["_id"]) for d in collection.find(args.ids, fields=["_id"])}
        collection.delete_many(present)
    missing = [i for i in args.ids if i not in present]
    print(f"deleted {len(present)} {args.type} documents from the warehouse")
    if missing:
        err(
            f"not in the warehouse: {', '.join(missing)} (delete events are sent anyway, so "
            "features left from earlier are removed)"
        )
    events = [change_event(args.type, i, "delete") for i in args.ids]
    published = publish(events, settings, args.no_publish, replay="llm-twin-features backfill")
    return 1 if missing or not published else 0


def change_event(data_type: str, entry_id: str, op: Operation) -> ChangeEvent:
    from llm_twin_features.events.schema import ChangeEvent

    return ChangeEvent(type=data_type, entry_id=entry_id, op=op)


def publish(events: list, settings: Settings, skip: bool, replay: str) -> bool:
    """Publishes change events after the warehouse write; False (and how to replay) on failure."""
    if skip or not events:
        return True
    from llm_twin_features.stores.queue import BrokerUnavailable, EventPublisher

    broker = settings.broker_config()
    try:
        with EventPublisher(broker) as publisher:
            publisher.publish(events)
    except BrokerUnavailable as error:
        err(
            f"error: {error}\n{len(events)} change events were NOT published; the warehouse "
            f"write stands. Replay with `{replay}` (rebuilds from the warehouse), or re-run "
            "this command once RabbitMQ is up."
        )
        return False
    print(f"published {len(events)} change events to {broker.address}/{broker.queue}")
    return True
